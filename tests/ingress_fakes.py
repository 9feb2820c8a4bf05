"""The ingress's FastAPI app in-process, without Ray: a fake controller and fake stage handles.

    app, inst = make_ingress({"models": ["tiny-sd3"], ...})   # ASGI app + the Ingress instance
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c: ...

Serve's class-based view finds the instance through `serve.get_replica_context()`; `make_ingress`
patches that (restore with `unpatch()`). Stages sleep `stage_s` (or wait on `gate`) and decode to
small frames, so PNG/MP4 encoding stays cheap; a diffuse asked for `partial_images` leaves that
many small PNGs in its mailbox (`previews`), as the real replica does. `make_ingress(..., real=True)`
runs real `StageReplica`s in-process instead (the tiny models, diffusers on the CPU).
"""
import asyncio
import types
from typing import Any

import numpy as np
import ray.serve

from trident_rs.executors.base import StagePayload
from trident_rs.serve.grant import Grant


class _Call:
    """Awaitable like a DeploymentResponse. Lazy ones run nothing unless awaited; eager ones (the
    controller's methods) start at once, like a real call sent on `.remote()` (fire and forget)."""

    cancelled_total = 0  # how many calls were cancelled (DeploymentResponse.cancel())

    def __init__(self, fn: Any, *args: Any, eager: bool = False):
        self.fn, self.args = fn, args
        self.cancelled = False
        self.task = asyncio.get_running_loop().create_task(fn(*args)) if eager else None

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            _Call.cancelled_total += 1
            if self.task is not None:
                self.task.cancel()

    def __await__(self):
        if self.task is not None:
            return self.task.__await__()
        return self.fn(*self.args).__await__()

    async def _to_object_ref(self) -> "_Ref":
        """Like DeploymentResponse._to_object_ref(): the (finished) result as an awaitable ref."""
        return _Ref(await self)


class _Ref:
    """Stands for an ObjectRef: awaiting it gives the value; stages accept it as input."""

    def __init__(self, value: Any):
        self.value = value

    def __await__(self):
        async def get():
            return self.value
        return get().__await__()


class _Method:
    def __init__(self, fn: Any, eager: bool = False):
        self.fn, self.eager = fn, eager

    def remote(self, *args: Any) -> _Call:
        return _Call(self.fn, *args, eager=self.eager)


class FakeController:
    """Grants every stage at once on `{stage}-w1` (the first with the answer to `submit`, as the
    real controller does when a replica is free); `done` grants are recorded in `done`. `fail[method] = exc` makes that method raise
    `exc` (e.g. ActorDiedError: the controller died) until removed."""

    def __init__(self):
        self.submitted: list[str] = []
        self.acquired: list[tuple[str, str]] = []
        self.finished: list[tuple[str, str]] = []
        self.done: list[tuple[str, str]] = []  # (request id, stage) reported done
        self.retries: list[tuple[str, str, int]] = []
        self.fail: dict[str, BaseException] = {}
        self.counts = {"encode-w1": 1, "diffuse-w1": 1, "decode-w1": 1}
        for name in ("submit", "acquire", "finish", "reject", "status", "request_status", "metrics_text",
                     "stage_retry", "regrant"):
            setattr(self, name, _Method(self._failing(name, getattr(self, "_" + name)), eager=True))

    def _failing(self, name, fn):
        async def call(*args):
            if name in self.fail:
                raise self.fail[name]
            return await fn(*args)
        return call

    @staticmethod
    def grant(rid, stage):
        return Grant(rid, stage, f"{stage}-w1", 1, batch_id=0)

    async def _submit(self, rid, *a):
        self.submitted.append(rid)
        return {"slo_s": 1.0, "counts": dict(self.counts), "grant": self.grant(rid, "encode")}

    def _done(self, done):
        if done is not None:
            self.done.append((done.request_id, done.stage))

    async def _acquire(self, rid, stage, done=None):
        self._done(done)
        self.acquired.append((rid, stage))
        return self.grant(rid, stage)

    async def _regrant(self, grant, here=None):
        return grant

    async def _finish(self, rid, state, done=None):
        self._done(done)
        self.finished.append((rid, state))

    async def _stage_retry(self, grant, attempt, error=""):
        self.retries.append((grant.request_id, grant.stage, attempt))

    async def _reject(self, reason=""):
        return None

    async def _status(self):
        return {"ok": True}

    async def _request_status(self, rid):
        return None

    async def _metrics_text(self):
        return "# fake\n"


class FakeStage:
    """A stage deployment. Each call first pops `deaths` (exceptions, e.g. ActorDiedError: the
    replica died mid-request) and raises it, if any are left."""

    def __init__(self, stage: str, stage_s: float = 0.0, gate: asyncio.Event | None = None):
        self.stage, self.stage_s, self.gate = stage, stage_s, gate
        self.calls = 0
        self.deaths: list[BaseException] = []
        self.grants: list[Grant] = []
        self.runs: list = []  # the params of every call that ran
        self.run = _Method(self._run)
        self.previews = _Method(self._previews)
        self.mailbox: dict[str, list] = {}

    async def _previews(self, rid: str, grant: Any = None, drop: bool = False) -> list:
        got = self.mailbox.pop(rid, [])
        if not drop:
            self.mailbox[rid] = []
        return got

    async def _run(self, prev: Any, grant: Grant) -> StagePayload:
        payload = await prev if isinstance(prev, (_Call, _Ref)) else prev
        self.calls += 1
        self.grants.append(grant)
        self.runs.append(payload.params)
        if self.deaths:
            raise self.deaths.pop(0)
        if self.gate is not None:
            await self.gate.wait()
        if self.stage_s:
            await asyncio.sleep(self.stage_s)
        tensors = {}
        if self.stage == "diffuse":
            from trident_rs.media import png_bytes

            for k in range(payload.meta.get("partial_images") or 0):
                self.mailbox.setdefault(payload.meta["request_id"], []).append(
                    (k, png_bytes(np.full((16, 16, 3), 40 * (k + 1), np.uint8))))
                await asyncio.sleep(0.01)
        if self.stage == "decode":
            frames = payload.params.num_frames or 1
            tensors["frames"] = np.zeros((min(frames, 2), 16, 16, 3), np.uint8)
        return StagePayload(payload.params, tensors, dict(payload.meta))


_ORIG = ray.serve.get_replica_context


async def settle() -> None:
    """Let the calls sent without waiting (the ingress's `finish`) reach the fake controller."""
    for _ in range(5):
        await asyncio.sleep(0)


class RealStage:
    """A real `StageReplica` behind a fake handle (`run`, `previews`): refs resolved, no Ray."""

    def __init__(self, config: dict, stage: str):
        from trident_rs.serve.stage_deployment import StageReplica

        self.replica = StageReplica(config, stage, 1)
        self.run = _Method(self._run)
        self.previews = _Method(self.replica.previews)

    async def _run(self, prev: Any, grant: Grant) -> StagePayload:
        payload = await prev if isinstance(prev, (_Call, _Ref)) else prev
        return await self.replica.run(payload, grant)


def make_ingress(config: dict, stage_s: float = 0.0, gate: asyncio.Event | None = None, real: bool = False):
    from trident_rs.serve import ingress as mod

    cls = mod.Ingress.__mro__[1]  # the user class under Serve's ASGI wrapper
    assert cls.__name__ == "Ingress" and cls is not mod.Ingress
    inst = cls.__new__(cls)
    stages = {f"{s}-w1": FakeStage(s, stage_s, gate if s == "diffuse" else None)
              for s in ("encode", "diffuse", "decode")}
    if real:
        stages = {f"{s}-w1": RealStage(config, s) for s in ("encode", "diffuse", "decode")}
    cls.__init__(inst, config, FakeController(), stages)
    ray.serve.get_replica_context = lambda: types.SimpleNamespace(servable_object=inst)
    return mod.api, inst


def unpatch() -> None:
    ray.serve.get_replica_context = _ORIG


def run_http(config: dict, scenario: Any, **kw: Any) -> Any:
    """`asyncio.run(scenario(client, ingress))` against a fresh in-process ingress."""
    import httpx

    app, inst = make_ingress(config, **kw)

    async def go():  # app errors become 500 responses, as under uvicorn (which also logs them)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as c:
            return await scenario(c, inst)
    try:
        return asyncio.run(go())
    finally:
        unpatch()


def _png(shape: tuple[int, ...], seed: int = 0) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def edit_bodies(scalars):
    """Multipart bodies (boundary `zz`) for `POST /v1/images/edits`: form fields from `scalars`,
    an `image` and a `mask` that are good, garbage, cut short, of another size or without alpha."""
    from hypothesis import strategies as st

    good, rgba = _png((16, 16, 3)), _png((16, 16, 4), 1)
    uploads = st.one_of(st.sampled_from([good, rgba, _png((32, 16, 4), 2), _png((16, 16)), good[:40], b"",
                                         b"GIF89a" + b"\0" * 20, _png((1, 1, 3))]), st.binary(max_size=48))
    names = st.sampled_from(["model", "prompt", "n", "size", "strength", "stream", "partial_images", "steps",
                             "seed", "response_format", "guidance_scale", "image", "mask", "bogus"])
    fields = st.dictionaries(names, scalars.map(lambda v: "" if v is None else str(v)[:40]), max_size=6)
    base = st.fixed_dictionaries({"model": st.sampled_from(["tiny-sd3", "tiny-cogvideox", "nope"]),
                                  "prompt": st.text(max_size=10)})
    files = st.dictionaries(st.sampled_from(["image", "mask", "image[]", "prompt"]), uploads, max_size=3)

    def body(base_fields, extra, uploaded):
        parts = [f'--zz\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode(errors="replace")
                 for k, v in {**base_fields, **extra}.items()]
        parts += [f'--zz\r\nContent-Disposition: form-data; name="{k}"; filename="f.png"\r\n'
                  f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n" for k, data in uploaded.items()]
        return b"".join(parts) + b"--zz--\r\n"

    return st.builds(body, base, fields, files)


# -- HTTP fuzzing (tests/test_admission.py runs a few hundred; benchmarks/fuzz_http.py 10,000) -------
FUZZ_CONFIG = {"models": ["tiny-sd3", "tiny-cogvideox"], "files": {"url": "memory://trident-fuzz"},
               "limits": {"max_body_bytes": 4096, "max_queue_per_model": 8, "max_n": 4}}


def http_requests():
    """Hypothesis strategy of (method, path, headers, body bytes) aimed at the ingress: the
    generation endpoints (JSON and form bodies, idempotency keys), image edits (multipart bodies
    with good, broken and mismatched images and masks, `edit_bodies`), the videos API (list,
    retrieve, content, delete), stored files, progress and cancel."""
    import json

    from hypothesis import strategies as st

    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                        st.text(max_size=30), st.sampled_from(["64x64", "256x256", "x", "0x0", "64X64",
                                                               "99999x99999", "tiny-sd3", "tiny-cogvideox",
                                                               "url", "b64_json", "4", "0.5", "-1", "1e9"]))
    values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), c, max_size=4)),
                          max_leaves=12)
    keys = st.sampled_from(["model", "prompt", "n", "size", "steps", "seed", "guidance_scale", "num_frames",
                            "negative_prompt", "slo_ms", "wait", "response_format", "height", "width",
                            "quality", "user", "bogus", "seconds", "input_reference"])
    good = st.fixed_dictionaries({"model": st.sampled_from(["tiny-sd3", "tiny-cogvideox", "nope", "sd3"]),
                                  "prompt": st.text(max_size=20)})
    body_obj = st.one_of(
        st.builds(lambda base, extra: {**base, **extra}, good, st.dictionaries(keys, values, max_size=5)),
        st.dictionaries(keys, values, max_size=6), values)

    def enc(o):
        return json.dumps(o, allow_nan=True).encode()

    bodies = st.one_of(body_obj.map(enc), st.binary(max_size=64),
                       st.sampled_from([b"", b"{", b"[" * 5000, b"\xff\xfe", b'{"model": "tiny-sd3", "prompt": "x", '
                                        b'"steps": 1e999}', b"x" * 5000, b"\x80\x04\x95 pickle?"]))
    post_paths = st.sampled_from(["/v1/images/generations", "/v1/images/edits", "/v1/videos", "/v1/generate",
                                  "/v1/requests/x/cancel", "/v1/requests/x-0/cancel"])
    ids = st.one_of(st.text(st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="/?#%"),
                            min_size=1, max_size=12),
                    st.sampled_from(["video_" + "0" * 32, "file_" + "0" * 32, "file_..", "video_"]))
    queries = st.lists(st.tuples(st.sampled_from(["limit", "order", "after", "variant", "x"]),
                                 st.one_of(st.sampled_from(["0", "1", "100", "101", "-5", "asc", "desc", "up",
                                                            "video", "thumbnail", "spritesheet", "", "1e99"]),
                                           ids)), max_size=3).map(lambda q: "&".join(f"{k}={v}" for k, v in q))
    get_paths = st.one_of(
        st.sampled_from(["/v1/models", "/healthz", "/v1/status", "/metrics", "/nope", "/v1/videos"]),
        st.builds(lambda q: f"/v1/videos?{q}", queries),
        st.builds(lambda s, q: f"/v1/videos/{s}/content?{q}", ids, queries),
        ids.flatmap(lambda s: st.sampled_from([f"/v1/videos/{s}", f"/v1/requests/{s}", f"/v1/files/{s}",
                                               f"/v1/files/{s}/content"])))
    ctypes = st.sampled_from([{"content-type": "application/json"}, {}, {"content-type": "text/plain"},
                              {"content-type": "multipart/form-data; boundary=zz"},
                              {"content-type": "application/x-www-form-urlencoded"}])
    keys_h = st.one_of(st.just({}), st.builds(
        lambda name, v: {name: v}, st.sampled_from(["idempotency-key", "x-request-id"]),
        st.one_of(st.sampled_from(["k", "k2", " ", "x" * 300]),
                  st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=10))))
    post_headers = st.builds(lambda a, b: {**a, **b}, ctypes, keys_h)
    edit_headers = st.builds(lambda a: {"content-type": "multipart/form-data; boundary=zz", **a}, keys_h)
    return st.one_of(st.tuples(st.just("POST"), post_paths, post_headers, bodies),
                     st.tuples(st.just("POST"), st.just("/v1/images/edits"), edit_headers, edit_bodies(scalars)),
                     st.tuples(st.just("GET"), get_paths, st.just({}), st.just(b"")),
                     st.tuples(st.just("DELETE"), ids.map(lambda s: f"/v1/videos/{s}"), st.just({}), st.just(b"")))
