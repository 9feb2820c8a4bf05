"""What a simulation leaves behind: each request's launches (`StageRecord`) and the run's
totals (`SimResult`), which the metrics and the benchmarks read."""
from __future__ import annotations

from dataclasses import dataclass, field

from trident_rs.policy.types import Cluster, Request


@dataclass(frozen=True)
class StageRecord:
    """One launch of one request, for its timeline: when it could start, when it ran, where."""

    stages: tuple[str, ...]
    ready: float  # arrival, or the end of the previous launch
    start: float
    end: float
    width: int
    node: int
    batch: int
    extra_s: float = 0.0  # transfer, overhead, regroup and offload time inside [start, end]
    steps: tuple[int, int] | None = None  # diffuse chunk: steps [a, b)

    @property
    def queued_s(self) -> float:
        return self.start - self.ready

    @property
    def run_s(self) -> float:
        return self.end - self.start


@dataclass
class SimResult:
    """Everything the metrics need, per request and per run."""

    policy: str
    cluster: Cluster
    requests: list[Request]
    finish: dict[str, float]  # request id -> time its decode finished
    busy_gpu_seconds: float
    end_time: float
    launches: int
    plan_changes: int
    schedule_calls: int
    decision_time_s: float  # wall time spent inside policy.schedule()
    wall_time_s: float
    in_flight_at_end: int
    replan_reasons: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # request id -> why (memory refusal)
    memory_refusals: int = 0  # launches refused
    timeline: dict[str, list[StageRecord]] = field(default_factory=dict)
    demoted: frozenset[str] = frozenset()  # requests the policy demoted as late (if it says)
    peak_paused_gb: float = 0.0  # most chunk state paused requests held in host memory at once
    adapter_hits: int = 0  # adapters diffuse launches found loaded
    adapter_loads: int = 0  # adapters diffuse launches loaded first

    def request_timeline(self, request_id: str) -> dict:
        """Queue and run time per launch, width, and whether the policy demoted the request."""
        recs = self.timeline.get(request_id, [])
        return {"stages": [{"stages": list(r.stages), "queued_s": r.queued_s, "run_s": r.run_s, "width": r.width,
                            "node": r.node, "batch": r.batch, "extra_s": r.extra_s,
                            **({"steps": list(r.steps)} if r.steps else {})} for r in recs],
                "demoted": request_id in self.demoted, "failed": self.failed.get(request_id, "")}
