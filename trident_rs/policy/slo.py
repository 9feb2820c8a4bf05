"""The SLO rule of the TridentServe authors' code (shared/workloads/README.md).

    deadline = arrival + 1.1 * round(scale * t_best) + 2 s

t_best is the diffuse stage's predicted time (per-step x steps) at the best width: the largest
sequence-parallel degree whose parallel efficiency (t1/tk)/k is at least 0.8. An "SLO scale"
sweep varies `scale`. A request with its own SLO simply overrides this.
"""
from __future__ import annotations

from trident_rs.errors import InvalidRequestError
from trident_rs.policy.cost_model import CostModel
from trident_rs.policy.types import Shape

DEFAULT_SCALE = 4.0
EFFICIENCY_THRESHOLD = 0.8
SLACK_FACTOR = 1.1
SLACK_S = 2.0


def best_diffuse_time(cost: CostModel, model: str, shape: Shape, steps: int) -> float:
    """Predicted diffuse seconds at the best width (efficiency >= 0.8)."""
    width = cost.best_width(model, shape, threshold=EFFICIENCY_THRESHOLD)
    return cost.stage_time(model, "diffuse", shape, width=width, steps=steps)


def slo_seconds(cost: CostModel, model: str, shape: Shape, steps: int, scale: float = DEFAULT_SCALE) -> float:
    """Seconds from arrival to deadline: 1.1 * round(scale * t_best) + 2."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise InvalidRequestError("steps", f"must be a positive integer, got {steps!r}")
    if not scale > 0:
        raise InvalidRequestError("slo_scale", f"must be positive, got {scale!r}")
    return SLACK_FACTOR * round(scale * best_diffuse_time(cost, model, shape, steps)) + SLACK_S


def deadline(cost: CostModel, model: str, shape: Shape, steps: int, arrival: float,
             scale: float = DEFAULT_SCALE) -> float:
    """Absolute deadline of a request that arrived at `arrival` (seconds)."""
    return arrival + slo_seconds(cost, model, shape, steps, scale)


__all__ = ["DEFAULT_SCALE", "best_diffuse_time", "deadline", "slo_seconds"]
