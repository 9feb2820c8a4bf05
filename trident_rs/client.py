"""A small Python client for the trident_rs HTTP API (httpx).

    from trident_rs.client import TridentClient
    png = TridentClient("http://127.0.0.1:8000").image("a red fox", model="tiny-sd3", seed=1)
"""
from __future__ import annotations

import base64
import time
from typing import Any

import httpx


class TridentHTTPError(RuntimeError):
    """The server answered with an error status; `status` and the server's `message`."""

    def __init__(self, status: int, message: str, param: str | None = None):
        self.status, self.message, self.param = status, message, param
        super().__init__(f"HTTP {status}: {message}")


class TridentClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", timeout_s: float = 600.0,
                 api_key: str | None = None):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url, timeout=timeout_s, headers=headers)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "TridentClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        r = self.http.request(method, path, **kw)
        if r.status_code >= 400:
            try:
                err = r.json().get("error", {})
            except ValueError:
                err = {"message": r.text}
            raise TridentHTTPError(r.status_code, err.get("message", r.text), err.get("param"))
        return r.json()

    def health(self) -> dict:
        return self._call("GET", "/healthz")

    def models(self) -> list[str]:
        return [m["id"] for m in self._call("GET", "/v1/models")["data"]]

    def status(self) -> dict:
        return self._call("GET", "/v1/status")

    def images(self, prompt: str, model: str, n: int = 1, size: str | None = None, **extra: Any) -> list[bytes]:
        """PNG bytes of `n` images (OpenAI images endpoint; extra: steps, seed, guidance_scale, ...)."""
        body = {"model": model, "prompt": prompt, "n": n, **({"size": size} if size else {}), **extra}
        data = self._call("POST", "/v1/images/generations", json=body)["data"]
        return [base64.b64decode(d["b64_json"]) for d in data]

    def image(self, prompt: str, model: str, **kw: Any) -> bytes:
        return self.images(prompt, model, n=1, **kw)[0]

    def generate(self, prompt: str, model: str, **knobs: Any) -> tuple[bytes, dict]:
        """Native endpoint with every knob; returns (PNG or MP4 bytes, the full answer)."""
        out = self._call("POST", "/v1/generate", json={"model": model, "prompt": prompt, **knobs})
        return base64.b64decode(out["b64"]), out

    def video(self, prompt: str, model: str, poll_s: float = 0.5, **knobs: Any) -> bytes:
        """MP4 bytes: submits a job, polls it until it completes (raises if it failed or was
        cancelled), then downloads its content."""
        job = self._call("POST", "/v1/videos", json={"model": model, "prompt": prompt, **knobs})
        while job["status"] not in ("completed", "failed", "cancelled"):
            time.sleep(poll_s)
            job = self._call("GET", f"/v1/videos/{job['id']}")
        if job["status"] != "completed":
            err = job.get("error") or {}
            cancelled = job["status"] == "cancelled" or err.get("code") == "cancelled"
            raise TridentHTTPError(499 if cancelled else 500, err.get("message", f"video job {job['status']}"))
        if "b64_json" in job:  # a server before the content endpoint
            return base64.b64decode(job["b64_json"])
        r = self.http.get(f"/v1/videos/{job['id']}/content")
        if r.status_code >= 400:
            raise TridentHTTPError(r.status_code, r.text)
        return r.content
