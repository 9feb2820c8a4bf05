"""Each handle call the ingress makes is a Serve request of its own (its own internal request id).

Every handle call made while serving one HTTP request inherits that request's internal request
id, and Serve 2.60's router hands a chosen replica to the pending call *with that id*
(`RequestRouter._fulfill_next_pending_request`, one index entry per id). Two calls of one
request pending at once for one deployment therefore collide: the second is never indexed, or
its entry is dropped when the first is fulfilled or cancelled, and it waits forever. A streamed
image polls its diffuse replica for previews while its `run` call is routed there, and `n > 1`
images run their stages side by side: both hung this way (CI, 2026-12-02). Kin of
ray-project/ray#66325 (routing tasks abandoning requests matched by id).
"""
from __future__ import annotations

import contextvars
import dataclasses
from typing import Any

from ray.serve import context as serve_context
from ray.serve._private.utils import generate_request_id


class OwnCalls:
    """A `DeploymentHandle` whose `method.remote(...)` calls each carry a fresh internal request
    id; everything else (the caller's request id for logs, its route) is kept. Any other
    attribute reads and writes go to the handle itself."""

    def __init__(self, handle: Any):
        object.__setattr__(self, "handle", handle)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.handle, name)
        return _Method(attr) if hasattr(attr, "remote") else attr

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.handle, name, value)


class _Method:
    """One method of the handle; `remote` as above, anything else is the method's own."""

    def __init__(self, method: Any):
        object.__setattr__(self, "method", method)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.method, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.method, name, value)

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        # run in a copy of the caller's context: the caller's own request id is left as it was
        return contextvars.copy_context().run(self._remote, args, kwargs)

    def _remote(self, args: tuple, kwargs: dict) -> Any:
        current = serve_context._get_serve_request_context()
        serve_context._serve_request_context.set(
            dataclasses.replace(current, _internal_request_id=generate_request_id()))
        return self.method.remote(*args, **kwargs)
