"""`ModelShares`: each model's share of one shared GPU pool, from its recent demand.

A model's demand is the predicted GPU-seconds of its arrivals (every stage at its cheapest
width), decayed with time constant `window_s`; it may hold GPUs in proportion to it. The prior
(`model -> share`, from past traffic or equal) only breaks ties before any arrival."""
from __future__ import annotations

import math


class ModelShares:
    def __init__(self, window_s: float, prior: dict[str, float] | None = None) -> None:
        self.window_s = window_s
        self.demand = {m: 1e-6 * v for m, v in (prior or {}).items()}
        self._at = 0.0

    def decay(self, now: float) -> None:
        if now > self._at:
            k = math.exp(-(now - self._at) / self.window_s)
            self.demand = {m: v * k for m, v in self.demand.items()}
            self._at = now

    def add(self, model: str, gpu_seconds: float, now: float) -> None:
        self.decay(now)
        self.demand[model] = self.demand.get(model, 0.0) + gpu_seconds

    def budgets(self, total_gpus: int, residency) -> tuple[dict[str, int], dict[str, int]]:
        """(GPUs each model may hold: its share of the demand, GPUs each holds now per `residency`)."""
        total = sum(self.demand.values()) or 1.0
        budget = {m: max(1, math.ceil(total_gpus * v / total)) for m, v in self.demand.items()}
        count: dict[str, int] = {}
        for held in residency.gpus.values():
            for m, _ in held.weights:
                count[m] = count.get(m, 0) + 1
        return budget, count
