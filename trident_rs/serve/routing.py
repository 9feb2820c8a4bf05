"""Which replica of a stage deployment a granted call goes to: the one with the shortest queue.

The policy grants a stage when it sees a free replica group of that (stage, width), but the
grant names the deployment, not a replica (Serve's replica ids come and go; the plan's group ids
do not follow them). Serve's default router samples two replicas and takes the less loaded, so
a small request can land behind a long one on a busy replica while another replica is idle.
This router offers every candidate as one rank; Serve's router then takes the replica with the
lowest queue length (its cached counts, probing the unknown ones), i.e. join-the-shortest-queue:
whenever the policy's picture holds (a free group exists), the call starts on an idle replica.
FIFO order across pending calls is kept (`FIFOMixin`).
"""
from __future__ import annotations

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica


class ShortestQueueRouter(FIFOMixin, RequestRouter):
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        return [list(candidate_replicas)] if candidate_replicas else []


ROUTER_CLASS = f"{__name__}:ShortestQueueRouter"
