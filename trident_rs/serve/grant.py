"""The one dispatch decision the controller hands out: run `stage` of a request, here, now.

A `Grant` names the deployment *and* the replica (Serve replica id) the policy's group is bound
to, the group, its width, the launch (batch) it belongs to and, for a diffuse chunk, its steps [a, b). It is built in one place per
origin: `Grant.for_launch` (the controller's policy launched it) and `Grant.on_last_plan` (the
ingress dispatches on its own while the controller is down; no replica, no batch).
It travels with the stage call (the stage router reads `replica_id`; the replica checks it and
gathers the `batch` members of one `batch_id`) and comes back to the controller with the next
`acquire` or with `finish`, which is how the controller learns that the stage is done.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trident_rs.policy.types import Launch
from trident_rs.vocab import Stage


@dataclass(frozen=True)
class Grant:
    request_id: str
    stage: Stage
    deployment: str
    width: int
    batch_id: int | None = None  # the launch; None: dispatched by the ingress on the last plan
    batch: int = 1  # requests in the launch, run together as one executor batch
    replica_id: str | None = None  # the Serve replica that must run it; None: any replica
    group: str = ""  # the plan's replica group
    node: int | None = None  # the plan's node index and GPUs of that group
    gpus: tuple[int, ...] = ()
    steps: tuple[int, int] | None = None  # a diffuse chunk: denoising steps [a, b); None: all left

    @property
    def chunked(self) -> bool:
        """A diffuse chunk: the request comes back to the controller at its end (a boundary)."""
        return self.steps is not None

    @property
    def local(self) -> bool:
        """Made by the ingress on the last plan: the controller does not know of it."""
        return self.batch_id is None

    @classmethod
    def for_launch(cls, request_id: str, launch: Launch, batch_id: int, deployment: str,
                   replica_id: str | None) -> "Grant":
        return cls(request_id, launch.stages[0], deployment, launch.width, batch_id, len(launch.request_ids),
                   replica_id, launch.group_id, launch.node, tuple(launch.gpus),
                   tuple(launch.steps) if launch.steps is not None else None)

    @classmethod
    def on_last_plan(cls, request_id: str, stage: Stage, deployment: str, width: int) -> "Grant":
        return cls(request_id, stage, deployment, width)

    def to_dict(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "stage": self.stage, "deployment": self.deployment,
                "width": self.width, "batch_id": self.batch_id, "batch": self.batch,
                "replica_id": self.replica_id, "group": self.group, "node": self.node, "gpus": list(self.gpus),
                "steps": list(self.steps) if self.steps is not None else None, "local": self.local}


class WrongReplicaError(RuntimeError):
    """A granted call reached a replica other than the one its grant names (the granted replica
    is gone): it is not run here; the ingress asks the controller for a new grant."""

    def __init__(self, grant: Grant, here: str):
        super().__init__(f"{grant.stage} of {grant.request_id} was granted to replica {grant.replica_id} "
                         f"of {grant.deployment}, not {here}")
        self.grant, self.here = grant, here

    def __reduce__(self):  # crosses process boundaries inside a RayTaskError
        return (type(self), (self.grant, self.here))


def is_wrong_replica(e: BaseException) -> bool:
    """Whether a stage call failed with `WrongReplicaError` (raised in the replica, so it may come
    wrapped in a `RayTaskError`)."""
    return isinstance(e, WrongReplicaError) or isinstance(getattr(e, "cause", None), WrongReplicaError)
