"""Which replica of a stage deployment a call goes to: the one its grant names.

The controller binds each group of the policy's plan to a real replica (Serve replica id, see
`trident_rs.serve.registry`) and its `Grant` names that replica. This router sends a granted
call to exactly that replica. If the replica is not among the router's candidates (it is
stopping, or the router has not seen it yet), the call waits up to `PIN_WAIT_S` for it to appear,
then goes to any replica, which refuses it (`WrongReplicaError`) so that the ingress has it
granted again: a granted call never runs silently somewhere else. Every member of a batched
launch names the same replica, so the batch runs there as one.

Calls without a replica in their grant (the controller is down, or no replica has registered
yet) go to the replica with the shortest queue: every candidate is offered as one rank and
Serve's router takes the one with the lowest queue length (its cached counts, probing the
unknown ones). Requests are matched to their own routing (Serve's default), not FIFO across
pending calls: a FIFO router may hand the replica chosen for one call to another.
"""
from __future__ import annotations

import time
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

PIN_WAIT_S = 1.0


def granted_replica(pending_request: PendingRequest | None) -> str | None:
    """The replica id named by the call's grant (`run(payload, grant)`), if any."""
    if pending_request is None:
        return None
    grant: Any = pending_request.kwargs.get("grant") if pending_request.kwargs else None
    if grant is None and len(pending_request.args) > 1:
        grant = pending_request.args[1]
    return getattr(grant, "replica_id", None)


class GrantRouter(RequestRouter):
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:  # Serve sleeps between empty attempts only when asked to:
            pending_request.routing_context.should_backoff = True  # else it spins, starving the loop
        want = granted_replica(pending_request)
        if want is None:
            return [list(candidate_replicas)]
        for r in candidate_replicas:
            if r.replica_id.unique_id == want:
                return [[r]]
        if time.time() - pending_request.created_at < PIN_WAIT_S:
            return []  # not (yet) a candidate: Serve tries again shortly
        return [list(candidate_replicas)]  # gone: the replica there refuses it and it is granted again


ShortestQueueRouter = GrantRouter  # the name earlier configs used
ROUTER_CLASS = f"{__name__}:GrantRouter"
