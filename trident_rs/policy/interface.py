"""The interface every policy implements, ours and the baselines.

In the style of vLLM v1's scheduler: the policy holds the queue, `schedule()` returns a plan
object (`SchedulerOutput`), and the policy never touches a device. A runtime (the simulator or
Ray Serve) calls it on every arrival, every finished launch, and at `next_wakeup()`.

Contract, checked by the runtimes and by property tests:
- a launch only uses GPUs listed free in the `ClusterState` it was given;
- a request's stages run in order encode -> diffuse -> decode, each exactly once;
- every request added is eventually launched to completion (never dropped), unless the
  runtime refuses a launch of it for memory (`on_launch_refused`): then it failed, visibly.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

from trident_rs.policy.types import ClusterState, Launch, PlacementPlan, Request, SchedulerOutput


class Policy(ABC):
    name: str = "policy"

    @abstractmethod
    def initial_plan(self, now: float) -> PlacementPlan | None:
        """The placement to start with; None for policies that use GPUs as one shared pool."""

    @abstractmethod
    def add_request(self, request: Request, now: float) -> None:
        """A request arrived; queue it."""

    @abstractmethod
    def on_launch_done(self, launch: Launch, now: float) -> None:
        """All stages of `launch` finished; its GPUs are free again."""

    def on_launch_refused(self, launch: Launch, now: float) -> None:
        """The runtime refused `launch` because it does not fit in GPU memory (it would OOM):
        its requests failed and are never launched again. Forget them."""
        raise NotImplementedError(f"{self.name}: a launch was refused for memory and the policy cannot forget it")

    @abstractmethod
    def schedule(self, state: ClusterState) -> SchedulerOutput:
        """Decide what starts now."""

    def next_wakeup(self, now: float) -> float | None:
        """When to call `schedule` again with no event (periodic policies); None = only on events."""
        return None

    def pending(self) -> int:
        """Requests added and not yet fully launched (for accounting)."""
        return 0
