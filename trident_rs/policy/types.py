"""The data the policy layer decides over. Plain frozen dataclasses, no ray, no torch."""
from __future__ import annotations

from dataclasses import dataclass, field

from trident_rs.vocab import STAGES, DeploymentKey, Shape, Stage

__all__ = [  # Stage, STAGES, Shape live on the ground floor (trident_rs.vocab); re-exported here
    "STAGES", "Cluster", "ClusterState", "DeploymentKey", "Launch", "PlacementPlan", "ReplicaGroup", "Request",
    "SchedulerOutput", "Shape", "Stage",
]


@dataclass(frozen=True)
class Request:
    """A request as the scheduler sees it (no prompt, no tensors).

    `steps`: the denoising steps its loop runs (an image edit runs only the share of its schedule
    that its strength keeps, `GenerationParams.denoise_steps`). `encode_image`: its encode stage
    also VAE-encodes an input image (an edit; `CostModel.stage_time`)."""

    id: str
    model: str
    shape: Shape
    steps: int
    arrival: float
    deadline: float
    encode_image: bool = False
    adapters: tuple[str, ...] = ()  # LoRA adapters the request applies (names; diffuse loads them)
    adapter_scales: tuple[float, ...] = ()  # their scales, in the same order

    @property
    def slo_s(self) -> float:
        return self.deadline - self.arrival

    def widest(self, stage: str) -> int | None:
        """The widest width `stage` of this request can run at, None if any: an edit's diffuse, and
        one with LoRA adapters, run at width 1 (xfuser has no img2img/inpaint pipelines, and a
        width-k replica loads no adapters; it refuses both)."""
        return 1 if (self.encode_image or self.adapters) and stage == "diffuse" else None

    @property
    def adapter_set(self) -> tuple[tuple[str, float], ...]:
        """(name, scale) pairs: only requests with equal sets share a launch."""
        return tuple(zip(self.adapters, self.adapter_scales or (1.0,) * len(self.adapters)))


@dataclass(frozen=True)
class Cluster:
    """`nodes` x `gpus_per_node` GPUs; the nodes in `down` are lost (a plan places nothing there)."""

    nodes: int
    gpus_per_node: int
    gpu_memory_gb: float = 48.0
    gpu_name: str = "L20"
    down: frozenset[int] = frozenset()

    @property
    def up(self) -> list[int]:
        """The nodes a plan may use, in order."""
        return [n for n in range(self.nodes) if n not in self.down]

    @property
    def total_gpus(self) -> int:
        """The GPUs of the nodes up."""
        return len(self.up) * self.gpus_per_node


@dataclass(frozen=True)
class ReplicaGroup:
    """`width` GPUs of one node that run `stages` of `model` together (k sequence-parallel ranks).

    Stage-level policies use groups with one stage each; pipeline-level ones use all three.
    """

    id: str
    model: str
    stages: tuple[Stage, ...]
    width: int
    node: int
    gpus: tuple[int, ...]  # GPU indices within the node, len == width

    def __post_init__(self) -> None:
        if len(self.gpus) != self.width:
            raise ValueError(f"group {self.id}: {len(self.gpus)} GPUs for width {self.width}")

    @property
    def deployment(self) -> str:
        """The Ray Serve deployment this group is a replica of, e.g. 'diffuse-w4'."""
        return DeploymentKey.of(self.stages, self.width).name


@dataclass(frozen=True)
class PlacementPlan:
    """Replica groups per stage, width and node. `None` plans mean a shared GPU pool."""

    groups: tuple[ReplicaGroup, ...]
    predicted_attainment: float | None = None
    stats: dict = field(default_factory=dict, compare=False, hash=False)

    def gpus_used(self, node: int) -> int:
        return sum(g.width for g in self.groups if g.node == node)

    def group(self, group_id: str) -> ReplicaGroup:
        for g in self.groups:
            if g.id == group_id:
                return g
        raise KeyError(group_id)

    def count(self) -> dict[str, int]:
        """Replica count per deployment name."""
        out: dict[str, int] = {}
        for g in self.groups:
            out[g.deployment] = out.get(g.deployment, 0) + 1
        return out

    def check(self, cluster: Cluster) -> None:
        """Raise ValueError if any node is over-allocated or any GPU is in two groups."""
        seen: set[tuple[int, int]] = set()
        for g in self.groups:
            if not 0 <= g.node < cluster.nodes:
                raise ValueError(f"group {g.id} on node {g.node} of {cluster.nodes}")
            for gpu in g.gpus:
                if not 0 <= gpu < cluster.gpus_per_node or (g.node, gpu) in seen:
                    raise ValueError(f"group {g.id}: GPU {g.node}:{gpu} out of range or taken twice")
                seen.add((g.node, gpu))


@dataclass(frozen=True)
class Launch:
    """Start `stages` of a batch of same-shape requests now on `gpus` of `node`.

    `group_id` names the plan's replica group when the policy has a plan; dynamic policies
    (shared GPU pool) leave it empty and pick GPUs directly. `offload` names stages of a
    multi-stage launch whose weights are loaded only while they run (see
    `CostModel.launch_memory`); the runtime charges the transfer.

    `steps` = (a, b) makes a diffuse-only launch a *chunk*: denoising steps [a, b) of every
    request in it (each must have done exactly a steps). A request whose chunk ends before its
    last step stays at diffuse, its latents and solver state kept, until a later chunk (at any
    width, on any GPUs) resumes it. None: all the steps still to do.
    """

    request_ids: tuple[str, ...]
    model: str
    stages: tuple[Stage, ...]
    width: int
    node: int
    gpus: tuple[int, ...]
    group_id: str = ""
    offload: tuple[Stage, ...] = ()  # stages whose weights stay in host memory between uses
    steps: tuple[int, int] | None = None  # diffuse chunk: steps [a, b)

    @property
    def batch(self) -> int:
        return len(self.request_ids)

    def finishes_stage(self, total_steps: int) -> bool:
        """Whether the launch completes its last stage (a chunk only at the request's last step)."""
        return self.steps is None or self.steps[1] >= total_steps


@dataclass(frozen=True)
class ClusterState:
    """What the runtime tells the policy at each `schedule` call."""

    now: float
    free_gpus: dict[int, frozenset[int]]  # node -> free GPU indices
    ready_groups: frozenset[str] = frozenset()  # plan groups started and idle
    down: frozenset[int] = frozenset()  # nodes lost: no GPU of theirs is free; a re-plan leaves them out


@dataclass(frozen=True)
class SchedulerOutput:
    """A policy's decision at one instant: what starts now, and optionally a new plan."""

    launches: tuple[Launch, ...] = ()
    new_plan: PlacementPlan | None = None
    replan_reason: str = ""
