"""Stored results (issue 18 part 4): PNGs and MP4s written through fsspec, served by id, expiring.

    store = FileStore("file:///var/lib/trident/files", expires_after_s=3600)
    meta = store.put(png, "image/png", "image.png")    # {"id": "file_<32 hex>", "expires_at": ...}
    data, meta = store.read(meta["id"])                 # NotFoundError (404) / GoneError (410)

`url` is any fsspec URL: a local directory (the default: `<tmp>/trident_rs_files`), `s3://bucket/
prefix` (needs `s3fs`), `gs://bucket/prefix` (needs `gcsfs`), `memory://x`. Each file is two
objects: `<id>` (the bytes) and `<id>.json` (its metadata: mime type, size, created and expiry
times), written in that order, so a file whose metadata can be read is complete, and every
ingress replica that shares the store can serve it. Expiry is checked on every read (an expired
file is removed and answers 410) and swept lazily: at most every `sweep_s`, on a write or read,
every expired file in the store is removed (also those written by an earlier process).
Ids are 128 random bits and are checked against `file_<32 hex>` before any path is built, so an
id can never name anything else in the store.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from trident_rs.errors import GoneError, NotFoundError, TridentError

logger = logging.getLogger("ray.serve")
ID_RE = re.compile(r"^file_[0-9a-f]{32}$")
DEFAULT_DIR = os.path.join(tempfile.gettempdir(), "trident_rs_files")


class FileStore:
    def __init__(self, url: str | None = None, expires_after_s: float | None = 3600.0, sweep_s: float = 60.0,
                 clock: Callable[[], float] = time.time):
        import fsspec

        self.url = url or DEFAULT_DIR
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.root = self.root.rstrip("/") or "/"
        self.expires_after_s, self.sweep_s, self.clock = expires_after_s, sweep_s, clock
        self._next_sweep = 0.0
        self._lock = threading.Lock()  # one sweep at a time (calls run in worker threads)
        self.stats = {"written": 0, "served": 0, "expired": 0}
        self.fs.makedirs(self.root, exist_ok=True)

    def _path(self, file_id: str, suffix: str = "") -> str:
        if not isinstance(file_id, str) or not ID_RE.match(file_id):
            raise NotFoundError("file_id", f"no file {str(file_id)[:80]!r}")
        return f"{self.root}/{file_id}{suffix}"

    # -- writing -------------------------------------------------------------------------------------
    def put(self, data: bytes, mime: str, filename: str, purpose: str = "output") -> dict[str, Any]:
        """Store `data`; returns its metadata (`id`, `bytes`, `created_at`, `expires_at`, ...)."""
        self.maybe_sweep()
        file_id = f"file_{uuid.uuid4().hex}"
        now = self.clock()
        expires = now + self.expires_after_s if self.expires_after_s else None
        meta = {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(now),
                "expires_at": int(expires) if expires is not None else None, "expires": expires,
                "filename": filename, "purpose": purpose, "mime_type": mime}
        with self.fs.open(self._path(file_id), "wb") as f:
            f.write(data)
        with self.fs.open(self._path(file_id, ".json"), "w") as f:  # last: its presence means complete
            f.write(json.dumps(meta))
        self.stats["written"] += 1
        return meta

    # -- reading -------------------------------------------------------------------------------------
    def meta(self, file_id: str) -> dict[str, Any]:
        """The metadata of a live file; `NotFoundError` (404) or `GoneError` (410)."""
        path = self._path(file_id, ".json")
        try:
            with self.fs.open(path, "r") as f:
                meta = json.loads(f.read())
        except (OSError, ValueError, KeyError):  # FileNotFoundError is an OSError; a torn write: ValueError
            raise NotFoundError("file_id", f"no file {file_id!r}") from None
        if meta.get("expires") is not None and self.clock() >= meta["expires"]:
            self.delete(file_id)
            self.stats["expired"] += 1
            raise GoneError("file_id", f"file {file_id!r} expired at {int(meta['expires'])} (unix time) "
                            "and was removed")
        return meta

    def read(self, file_id: str) -> tuple[bytes, dict[str, Any]]:
        meta = self.meta(file_id)  # 410 for this file if it expired, before any sweep removes it
        self.maybe_sweep()
        try:
            with self.fs.open(self._path(file_id), "rb") as f:
                data = f.read()
        except OSError:
            raise NotFoundError("file_id", f"no file {file_id!r}") from None
        self.stats["served"] += 1
        return data, meta

    def exists(self, file_id: str) -> bool:
        try:
            self.meta(file_id)
            return True
        except TridentError:
            return False

    # -- removing ------------------------------------------------------------------------------------
    def delete(self, file_id: str) -> None:
        for suffix in (".json", ""):  # metadata first: a half-removed file is never served
            try:
                self.fs.rm(self._path(file_id, suffix))
            except (OSError, KeyError):  # gone already
                pass

    def maybe_sweep(self) -> int:
        """`sweep()` if `sweep_s` has passed since the last one; the number removed."""
        now = self.clock()
        if now < self._next_sweep or not self._lock.acquire(blocking=False):
            return 0
        try:
            self._next_sweep = now + self.sweep_s
            return self.sweep()
        finally:
            self._lock.release()

    def sweep(self) -> int:
        """Remove every expired file in the store (any process's); the number removed."""
        removed = 0
        try:
            names = self.fs.ls(self.root, detail=False)
        except OSError:
            return 0
        now = self.clock()
        for name in names:
            base = str(name).rstrip("/").rsplit("/", 1)[-1]
            if not base.endswith(".json") or not ID_RE.match(base[:-5]):
                continue
            try:
                with self.fs.open(f"{self.root}/{base}", "r") as f:
                    expires = json.loads(f.read()).get("expires")
            except (OSError, ValueError, KeyError):
                continue
            if expires is not None and now >= expires:
                self.delete(base[:-5])
                removed += 1
        if removed:
            self.stats["expired"] += removed
            logger.info("file store %s: removed %d expired file(s)", self.url, removed)
        return removed

    def snapshot(self) -> dict[str, Any]:
        return {"url": self.url, "expires_after_s": self.expires_after_s, **self.stats}
