"""Admission control at the ingress (issue 8).

A bounded queue per model: the count of accepted-not-finished requests (one entry per request
id, released when the request ends however it ends: done, failed, or cancelled by a client
disconnect). When a model's queue is full the request is refused with `OverloadedError`
(HTTP 429 + `Retry-After`). With `limits.admission: reject` a request is also refused when its
predicted completion, `own time + outstanding work / servers`, exceeds its SLO; with
`best_effort` (default) it is accepted anyway. The prediction uses the cost model (the same
`predict_stage_s` the emulated executors sleep on, × `time_scale`), so it is an estimate.
Memory is O(sum of the queue bounds): nothing is kept for refused or finished requests.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

from trident_rs.errors import OverloadedError


def cost_estimator(cfg: Any) -> tuple[Callable[[Any], float], Callable[[Any], float]]:
    """(params -> predicted seconds for all stages at width 1, params -> the request's SLO in
    seconds): the cost model (else the fallback), and the SLO the controller dispatches on
    (`trident_rs.serve.slo`), both on the served clock."""
    from trident_rs.policy.stage_estimate import default_cost_model, predict_stage_s
    from trident_rs.serve.slo import clock_scale, request_slo_s
    from trident_rs.vocab import STAGES

    cost: Any = "unloaded"
    scale = clock_scale(cfg)

    def model() -> Any:
        nonlocal cost
        if cost == "unloaded":  # the controller warns when there is none
            cost = default_cost_model()
        return cost

    def estimate(params: Any) -> float:
        return scale * sum(predict_stage_s(model(), params.model, s, params.shape, 1, 1, params.steps or 1)
                           for s in STAGES)

    def slo(params: Any) -> float:
        return request_slo_s(model(), params, scale=cfg.slo_scale, clock=scale)

    return estimate, slo


class Admission:
    def __init__(self, max_queue: int, mode: str = "best_effort", servers: int = 1,
                 estimate: Callable[[Any], float] | None = None, slo_scale: float = 4.0,
                 clock: Callable[[], float] = time.monotonic, slo: Callable[[Any], float] | None = None):
        """`slo(params)`: the request's SLO in seconds (the controller's definition, see
        `trident_rs.serve.slo`); without it, `slo_ms` else `slo_scale` × `estimate(params)`."""
        self.max_queue, self.mode, self.servers = max_queue, mode, max(1, servers)
        self.estimate, self.slo_scale, self.clock, self.slo = estimate, slo_scale, clock, slo
        self.held: dict[str, tuple[str, float]] = {}  # rid -> (model, predicted work s)
        self.per_model: dict[str, int] = {}
        self.work_s = 0.0  # predicted work of everything held (all models share the GPUs)
        self.stats = {"admitted": 0, "rejected_full": 0, "rejected_slo": 0}

    @classmethod
    def from_config(cls, cfg: Any) -> "Admission":
        lim = cfg.limits
        servers = lim.admission_servers or sum(d.replicas for d in cfg.deployments if d.stage == "diffuse")
        estimate, slo = cost_estimator(cfg)
        return cls(lim.max_queue_per_model, lim.admission, servers, estimate, cfg.slo_scale, slo=slo)

    def queued(self, model: str) -> int:
        return self.per_model.get(model, 0)

    def _retry_after(self, model: str) -> float:
        """Time for the queue to drain by one `servers`-wide wave (at least 1 s)."""
        mean = self.work_s / len(self.held) if self.held else 1.0
        return max(1.0, math.ceil(mean * max(1, self.queued(model)) / self.servers))

    def admit(self, rid: str, params: Any) -> None:
        """Reserve a slot for `rid` or raise `OverloadedError`; idempotent for a held `rid`."""
        self.admit_many([rid], params)

    def admit_many(self, rids: Iterable[str], params: Any) -> None:
        """All of `rids` (one model) or none: the `n` images of one call are admitted together."""
        rids = [r for r in dict.fromkeys(rids) if r not in self.held]
        if not rids:
            return
        model = params.model
        if self.queued(model) + len(rids) > self.max_queue:
            self.stats["rejected_full"] += 1
            raise OverloadedError(f"{model}: {self.queued(model)} requests queued (limit {self.max_queue}); "
                                  "retry later", self._retry_after(model))
        own = self.estimate(params) if self.estimate is not None else 0.0
        if self.mode == "reject" and self.estimate is not None:
            if self.slo is not None:
                slo_s = self.slo(params)
            else:
                slo_s = params.slo_ms / 1000.0 if params.slo_ms else self.slo_scale * own
            predicted = own + (self.work_s + own * (len(rids) - 1)) / self.servers
            if predicted > slo_s:
                self.stats["rejected_slo"] += 1
                raise OverloadedError(f"{model}: predicted completion {predicted:.2f}s exceeds the SLO "
                                      f"{slo_s:.2f}s under the current load; retry later",
                                      max(1.0, predicted - slo_s))
        for r in rids:
            self.held[r] = (model, own)
            self.per_model[model] = self.queued(model) + 1
            self.work_s += own
        self.stats["admitted"] += len(rids)

    def release(self, rid: str) -> None:
        entry = self.held.pop(rid, None)
        if entry is None:
            return
        model, own = entry
        left = self.per_model.get(model, 1) - 1
        if left > 0:
            self.per_model[model] = left
        else:
            self.per_model.pop(model, None)
        self.work_s = max(0.0, self.work_s - own) if self.held else 0.0

    def snapshot(self) -> dict:
        return {"queued": dict(self.per_model), "work_s": round(self.work_s, 3), **self.stats}
