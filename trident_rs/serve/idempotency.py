"""Idempotent generation calls (issue 18 part 5): a repeated `Idempotency-Key` (or `X-Request-Id`)
header gets the first call's job or result and never starts a second generation.

    result = await cache.run("/v1/images/generations", key, fingerprint, lambda: make_images())

- The first call with a key runs; a repeat while it runs waits for the same run (it never starts
  its own), and a repeat after it succeeded gets the same result at once.
- A key is bound to its request: a repeat whose body differs gets 409 naming the header.
- A run that fails or is cancelled forgets its key (there is no result to return; a retry runs
  again); repeats that were waiting for it get the same error (a cancelled run: 499).
- Keys are per endpoint, remembered `ttl_s` after their result, at most `max_keys` of them and
  `max_bytes` of results (least recently used dropped first; a key still running is never dropped).

Video jobs remember the job id (a few bytes): the job itself is the result (see the ingress).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from trident_rs.errors import ConflictError, InvalidRequestError
from trident_rs.serve.cancellation import RequestCancelled

T = TypeVar("T")
HEADERS = ("idempotency-key", "x-request-id")  # the first present is the key
MAX_KEY_CHARS = 255


def key_of(headers: Any) -> tuple[str, str] | None:
    """(header name, key) from request headers, or None; `InvalidRequestError` for a bad key."""
    for name in HEADERS:
        value = headers.get(name)
        if value is None:
            continue
        pretty = "Idempotency-Key" if name == HEADERS[0] else "X-Request-Id"
        if not value.strip() or len(value) > MAX_KEY_CHARS:
            raise InvalidRequestError(pretty, f"must be 1 to {MAX_KEY_CHARS} characters")
        return pretty, value
    return None


def fingerprint(body: Any) -> str:
    """A digest of a request body (its JSON, keys sorted): what a key is bound to."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def size_of(obj: Any) -> int:
    """Rough bytes held by a result: the strings and bytes in it."""
    if isinstance(obj, (str, bytes)):
        return len(obj)
    if isinstance(obj, dict):
        return sum(size_of(k) + size_of(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return sum(size_of(v) for v in obj)
    return 8


class _Entry:
    __slots__ = ("fingerprint", "future", "size", "t")

    def __init__(self, fp: str, future: asyncio.Future):
        self.fingerprint, self.future, self.size, self.t = fp, future, 0, None


class IdempotencyCache:
    def __init__(self, ttl_s: float = 3600.0, max_keys: int = 1000, max_bytes: int = 256 << 20,
                 clock: Callable[[], float] = time.monotonic):
        self.ttl_s, self.max_keys, self.max_bytes, self.clock = ttl_s, max_keys, max_bytes, clock
        self.entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self.bytes = 0
        self.stats = {"runs": 0, "replays": 0, "joined": 0, "conflicts": 0}

    @classmethod
    def from_config(cls, cfg: Any) -> "IdempotencyCache":
        lim = cfg.limits
        return cls(lim.idempotency_ttl_s, lim.idempotency_keys, lim.idempotency_bytes)

    async def run(self, scope: str, key: tuple[str, str] | None, fp: str, fn: Callable[[], Awaitable[T]]) -> T:
        """`await fn()` once per (scope, key); see the module docstring. No key: just `fn()`."""
        if key is None:
            return await fn()
        header, value = key
        self._expire()
        k = (scope, value)
        entry = self.entries.get(k)
        if entry is not None:
            if entry.fingerprint != fp:
                self.stats["conflicts"] += 1
                raise ConflictError(header, f"{header} {value!r} was used for a different request to {scope}; "
                                    "use a new key for a new request")
            self.entries.move_to_end(k)
            if entry.future.done():
                self.stats["replays"] += 1
            else:
                self.stats["joined"] += 1
            return await self._join(entry, value)
        fut = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # no "never retrieved" warnings
        entry = self.entries[k] = _Entry(fp, fut)
        self.stats["runs"] += 1
        try:
            result = await fn()
        except BaseException as e:
            if self.entries.get(k) is entry:
                del self.entries[k]
            if isinstance(e, (asyncio.CancelledError, RequestCancelled)):
                fut.set_exception(RequestCancelled(value))
            else:
                fut.set_exception(e)
            raise
        fut.set_result(result)
        if self.entries.get(k) is entry:
            entry.size, entry.t = size_of(result), self.clock()
            self.bytes += entry.size
            self._evict()
        return result

    @staticmethod
    async def _join(entry: _Entry, value: str) -> Any:
        try:
            return await asyncio.shield(entry.future)
        except RequestCancelled:
            raise RequestCancelled(value) from None

    def forget(self, scope: str, value: str) -> None:
        entry = self.entries.pop((scope, value), None)
        if entry is not None:
            self.bytes -= entry.size

    def _expire(self) -> None:
        cut = self.clock() - self.ttl_s
        for k in [k for k, e in self.entries.items() if e.t is not None and e.t < cut]:
            self.forget(*k)

    def _evict(self) -> None:
        while len(self.entries) > self.max_keys or self.bytes > self.max_bytes:
            done = next((k for k, e in self.entries.items() if e.t is not None), None)
            if done is None:
                return
            self.forget(*done)

    def snapshot(self) -> dict:
        return {"keys": len(self.entries), "bytes": self.bytes, **self.stats}
