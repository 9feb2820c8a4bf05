"""Cancelling queued or running requests at the ingress (issue 8, item 3).

The ingress registers, per request id, every `DeploymentResponse` it creates (the controller's
`acquire` and each stage's `run`) and awaits them through `watch`. `cancel(rid)` marks the
request, calls `DeploymentResponse.cancel()` on all of them (Serve cancels the call on its
replica; the controller's `finish(rid, ok=False)` then frees what the request held) and wakes
the waiting handler, which answers `RequestCancelled` (HTTP 499). A client that disconnects
cancels the handler task instead; `end(rid, ok=False)` then cancels whatever is still pending.
Only in-flight ids are kept, so memory is bounded by admission control.
A diffuse chunk (issue 17) is added and watched with `shield=True`: a cancel does not interrupt
it; the ingress checks `cancelled(rid)` when it ends and stops the request at that boundary.
"""
from __future__ import annotations

import asyncio
from typing import Any

from trident_rs.errors import TridentError


class RequestCancelled(TridentError):
    """The request was cancelled (cancel endpoint) before it finished."""

    http_status = 499  # "client closed request": not a server error

    def __init__(self, rid: str):
        self.field = None
        super().__init__(f"request {rid!r} was cancelled")


class _State:
    __slots__ = ("responses", "shielded", "waiting", "cancelled")

    def __init__(self) -> None:
        self.responses: list[Any] = []
        self.shielded: list[Any] = []  # run to their end on a cancel; cancelled by `end` only
        self.waiting: asyncio.Future | None = None
        self.cancelled = False


def _cancel(resp: Any) -> None:
    try:
        resp.cancel()
    except Exception:  # noqa: BLE001 - a finished or foreign response: nothing to cancel
        pass


class Inflight:
    def __init__(self) -> None:
        self.states: dict[str, _State] = {}

    def add(self, rid: str, resp: Any, shield: bool = False) -> Any:
        """Register a response (passed on unawaited to the next stage); returns it. `shield`: a
        cancel lets it run to its end (the request stops after it)."""
        st = self.states.setdefault(rid, _State())
        if shield:
            if hasattr(resp, "cancel") and not any(r is resp for r in st.shielded):
                st.shielded.append(resp)
            return resp
        if hasattr(resp, "cancel"):
            st.responses.append(resp)
        if st.cancelled:
            _cancel(resp)
        return resp

    async def watch(self, rid: str, aw: Any, shield: bool = False) -> Any:
        """Await `aw` (registered); raise `RequestCancelled` if `cancel(rid)` is called meanwhile.
        `shield`: a cancel meanwhile does not interrupt it (see `cancelled`)."""
        self.add(rid, aw, shield=shield)
        st = self.states[rid]
        if shield:  # the caller checks `cancelled` when it is done
            return await aw
        if st.cancelled:
            raise RequestCancelled(rid)
        fut = asyncio.ensure_future(aw)
        st.waiting = fut
        try:
            return await fut
        except BaseException:
            if st.cancelled and not _self_cancelling():  # the cancel endpoint, not a disconnect
                raise RequestCancelled(rid) from None
            raise
        finally:
            st.waiting = None

    def cancel(self, rid: str) -> list[str]:
        """Cancel `rid` and its `rid-i` siblings (the n images of one call); the ids cancelled."""
        hits = [r for r in self.states if r == rid or r.startswith(f"{rid}-")]
        for r in hits:
            st = self.states[r]
            st.cancelled = True
            for resp in st.responses:
                _cancel(resp)
            if st.waiting is not None and not st.waiting.done():
                st.waiting.cancel()
        return hits

    def cancelled(self, rid: str) -> bool:
        st = self.states.get(rid)
        return st is not None and st.cancelled

    def end(self, rid: str, ok: bool) -> None:
        st = self.states.pop(rid, None)
        if st is not None and not ok:
            for resp in st.responses + st.shielded:  # disconnects and failures: free the replicas too
                _cancel(resp)


def _self_cancelling() -> bool:
    task = asyncio.current_task()
    return bool(task is not None and task.cancelling())
