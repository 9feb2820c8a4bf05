"""What one launch costs in the simulated cluster, the same under every policy: its stages'
compute time (the cost model's prediction times a common random factor), the weights its GPUs
must load first (shared-pool launches, `WeightResidency`) and the LoRA adapters they lack.
The engine adds what depends on the run's state (moving a request's data, overheads)."""
from __future__ import annotations

import random
import zlib

from trident_rs.policy.adapters import AdapterResidency
from trident_rs.policy.baselines import stage_width
from trident_rs.policy.residency import WeightResidency
from trident_rs.policy.types import Cluster, Launch, Request, Shape
from trident_rs.sim.config import SimConfig


class LaunchCost:
    def __init__(self, cost, cluster: Cluster, config: SimConfig) -> None:
        self.cost, self.config = cost, config
        self._stage_s: dict[tuple, float] = {}
        self._noise: dict[tuple[str, str], float] = {}  # (request, stage) -> its time factor
        self.adapters = AdapterResidency(config.lora_slots, config.adapter_load_s)
        self.residency = WeightResidency(  # what each GPU holds, for shared-pool launches
            cost, cluster.gpu_memory_gb, config.start_cost_s if config.model_load_s is None else config.model_load_s,
            config.regroup_s)

    def compute_s(self, launch: Launch, requests: list[Request], steps: int) -> float:
        """The launch's stages at its width and batch, each at its requests' mean noise factor
        (a batch runs as fast as its members on average)."""
        first, batch = requests[0], len(requests)
        edit = any(r.encode_image for r in requests)  # an edit in the batch
        return sum(self.stage_s(launch.model, s, first.shape, launch.width, batch, steps, edit)
                   * (sum(self.noise(r.id, s) for r in requests) / batch if self.config.noise > 0 else 1.0)
                   for s in launch.stages)

    def stage_s(self, model: str, stage: str, shape: Shape, width: int, batch: int, steps: int,
                encode_image: bool = False) -> float:
        key = (model, stage, shape, width, batch, steps, encode_image)
        t = self._stage_s.get(key)
        if t is None:
            w = stage_width(model, stage, width)  # the widest degree the stage supports within the launch
            edit = {"encode_image": True} if encode_image else {}  # (cost models without edits keep working)
            t = self._stage_s[key] = float(self.cost.stage_time(model, stage, shape, width=w, batch=batch,
                                                                steps=steps if stage == "diffuse" else 1, **edit))
        return t

    def noise(self, rid: str, stage: str) -> float:
        """The lognormal time factor of `stage` of request `rid`: drawn from (seed, request,
        stage) alone, so every policy runs the same request's stage at the same factor (common
        random numbers: policies differ by their decisions, not by their luck), and the chunks
        of one diffuse share it (a slow request is slow at every step: chunking does not
        average its noise away)."""
        key = (rid, stage)
        factor = self._noise.get(key)
        if factor is None:
            sigma = self.config.noise
            rng = random.Random(zlib.crc32(f"{self.config.seed}/{rid}/{stage}".encode()))
            factor = self._noise[key] = rng.lognormvariate(-sigma * sigma / 2, sigma)
        return factor

    def weights_s(self, launch: Launch, shape: Shape) -> float:
        """Shared-pool launches (no replica group) pay for the weights their GPUs lack and for
        regrouping (`WeightResidency`), and their GPUs hold the launch's weights after it.
        Replica groups pay their start cost instead."""
        if launch.group_id:
            return 0.0
        r = self.residency
        cost = r.load_s(launch.model, launch.stages, launch.node, launch.gpus, launch.offload)
        r.record(launch.model, launch.stages, launch.node, launch.gpus, shape, launch.offload)
        return cost

    def adapters_s(self, launch: Launch, requests: list[Request]) -> float:
        """A diffuse launch first loads the LoRA adapters its replica group (pool launches: its
        GPUs) lacks; the batch's requests share one adapter set, as the executors run them."""
        if "diffuse" not in launch.stages:
            return 0.0
        names = tuple(dict.fromkeys(a for r in requests for a in r.adapters))
        key = launch.group_id or (launch.node, tuple(sorted(launch.gpus)))
        return self.adapters.use(key, names) * self.adapters.load_s

    def node_lost(self, node: int) -> None:
        """A node lost takes the weights its GPUs held (it comes back empty)."""
        for key in [k for k in self.residency.gpus if k[0] == node]:
            del self.residency.gpus[key]
