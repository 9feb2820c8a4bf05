"""The simulated cluster's physical knobs (`SimConfig`): what every policy is charged."""
from __future__ import annotations

from dataclasses import dataclass

from trident_rs.policy.adapters import ADAPTER_LOAD_S
from trident_rs.policy.payload_size import CHUNK_BOUNDARY_S, SERVE_HOP_OVERHEAD_S, SERVE_REQUEST_OVERHEAD_S
from trident_rs.policy.residency import DEFAULT_REGROUP_S


@dataclass(frozen=True)
class SimConfig:
    """Physical knobs of the simulated cluster.

    Every policy is charged the same: stage times drawn around the cost model's prediction
    (`noise`, lognormal, mean 1; policies only ever see predictions), GPU memory (a launch that
    would not fit is refused, as it would OOM: its requests fail), the Serve runtime's overhead
    per stage hop and per request, transfers between stages on different GPUs, the start of a
    new replica group (`start_cost_s`) and, for shared-pool launches (no replica group),
    regrouping GPUs into a new sequence-parallel group (`regroup_s`), loading another model
    onto them (`model_load_s`, default the start cost) or copying in a stage's weights they do
    not hold (`WeightResidency`). Diffuse chunks (`Launch.steps`) pay `chunk_boundary_s` when
    they resume a request, and move its chunk state (`chunk_state_bytes`) between GPUs, or back
    from host memory where the request was paused; paused state beyond `host_memory_gb` is a
    policy violation. A node lost (`node_faults`) takes its GPUs, its replica groups and the
    weights they held; a launch running there is re-run from its start elsewhere, as Serve's
    ingress does (on no GPUs the policy accounts for); the policy sees the node in
    `ClusterState.down` until it is back, and its plan's groups there start again (start cost)
    once it is."""

    noise: float = 0.0  # sigma of a mean-1 lognormal factor per (request, stage), the same under every policy
    seed: int = 0
    intra_node_gbps: float = 20.0  # GB/s between GPUs of one node (PCIe)
    inter_node_gbps: float = 10.0  # GB/s between nodes
    start_cost_s: float = 20.0  # seconds until a replica group added by a new plan is ready
    until: float | None = None  # stop at this virtual time (unfinished requests stay unfinished)
    max_idle_wakeups: int = 10_000  # empty periodic wakeups with nothing else to do -> stall
    enforce_memory: bool = True  # refuse launches whose predicted peak exceeds GPU memory
    hop_overhead_s: float = SERVE_HOP_OVERHEAD_S  # added to every launch
    request_overhead_s: float = SERVE_REQUEST_OVERHEAD_S  # added to every request's latency
    regroup_s: float = DEFAULT_REGROUP_S
    model_load_s: float | None = None  # None: start_cost_s
    chunk_boundary_s: float = CHUNK_BOUNDARY_S  # added to every chunk that resumes a request
    host_memory_gb: float = 512.0  # paused requests' chunk state held in host memory, cluster-wide
    # LoRA adapters: each diffuse replica group (or pool GPU set) keeps an LRU of `lora_slots`;
    # a diffuse launch first loads the adapters its GPUs lack, `adapter_load_s` each
    adapter_load_s: float = ADAPTER_LOAD_S
    lora_slots: int = 4
    node_faults: tuple[tuple[float, int, float], ...] = ()  # (when lost, node, when back; inf: never)

    @classmethod
    def ideal(cls, **overrides) -> "SimConfig":
        """No noise, no overheads, no regroup cost, memory unchecked: the engine before the
        fair yardstick (for before/after comparisons and for exact-timing tests)."""
        base = dict(enforce_memory=False, hop_overhead_s=0.0, request_overhead_s=0.0, regroup_s=0.0,
                    model_load_s=0.0)
        return cls(**{**base, **overrides})
