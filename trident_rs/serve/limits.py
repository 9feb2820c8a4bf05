"""Request limits and the ingress guard (issue 8).

- `check_limits(limits, params)`: the configurable caps (`AppConfig.limits`) on top of each
  model's spec limits, on a resolved `GenerationParams`; raises `InvalidRequestError(field)`.
- `GuardMiddleware`: a pure ASGI middleware installed on the ingress's FastAPI app *before*
  `@serve.ingress` freezes it. Per request it (1) checks the API key (`auth.authorized`, 401),
  (2) reads the body up to `max_body_bytes` (413 beyond, whatever Content-Length claims), and
  (3) for JSON bodies checks that they parse (422 naming `body`) before FastAPI sees them.
  Bodies are only ever parsed as JSON: nothing a client sends is unpickled or evaluated.

The config it enforces is set per process by `configure(cfg)` (one Ingress per replica process).
"""
from __future__ import annotations

import json
from typing import Any

from trident_rs.errors import InvalidRequestError
from trident_rs.serve.auth import authorized, load_keys
from trident_rs.vocab import error_body


def check_limits(limits: Any, params: Any) -> Any:
    """`params` (resolved) if within `limits`, else `InvalidRequestError` naming the field."""
    if limits.max_prompt_chars is not None:
        for name in ("prompt", "negative_prompt"):
            if len(getattr(params, name) or "") > limits.max_prompt_chars:
                raise InvalidRequestError(name, f"longer than {limits.max_prompt_chars} characters")
    if limits.max_size is not None:
        for name in ("height", "width"):
            v = getattr(params, name)
            if v is not None and v > limits.max_size:
                raise InvalidRequestError(name, f"{v} exceeds the maximum {limits.max_size}")
    if limits.max_steps is not None and params.steps is not None and params.steps > limits.max_steps:
        raise InvalidRequestError("steps", f"{params.steps} exceeds the maximum {limits.max_steps}")
    if limits.max_frames is not None and params.num_frames is not None and params.num_frames > limits.max_frames:
        raise InvalidRequestError("num_frames", f"{params.num_frames} exceeds the maximum {limits.max_frames}")
    return params


class _Settings:
    max_body_bytes: int = 1 << 20
    keys: tuple[str, ...] = ()


SETTINGS = _Settings()


def configure(cfg: Any, env: dict[str, str] | None = None) -> None:
    """Apply `cfg.limits` (body size, API keys + env TRIDENT_API_KEYS) to this process's guard."""
    SETTINGS.max_body_bytes = int(cfg.limits.max_body_bytes)
    SETTINGS.keys = load_keys(cfg.limits.api_keys, env)


def _error_body(status: int, message: str, kind: str, param: str | None) -> bytes:
    return json.dumps(error_body(message, kind, status, param)).encode()


async def _send_error(send: Any, status: int, message: str, kind: str, param: str | None = None,
                      headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = _error_body(status, message, kind, param)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        auth = headers.get(b"authorization", b"").decode("latin-1")
        if not authorized(SETTINGS.keys, path, auth):
            return await _send_error(send, 401, "missing or wrong API key (Authorization: Bearer <key>)",
                                     "AuthenticationError", None, [(b"www-authenticate", b"Bearer")])
        limit = SETTINGS.max_body_bytes
        try:
            declared = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            declared = 0
        if declared > limit:
            return await _send_error(send, 413, f"body of {declared} bytes exceeds {limit}", "PayloadTooLargeError")
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:  # read at most limit + one chunk, then replay
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await _send_error(send, 413, f"body exceeds {limit} bytes", "PayloadTooLargeError")
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        ctype = headers.get(b"content-type", b"").decode("latin-1").lower()
        if "json" in ctype or (body and not ctype):  # bodiless POSTs (cancel) pass through
            try:
                json.loads(body)
            except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
                return await _send_error(send, 422, f"body: malformed JSON ({type(e).__name__}: {str(e)[:120]})",
                                         "InvalidRequestError", "body")
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # disconnect notices after the body

        return await self.app(scope, replay, send)
