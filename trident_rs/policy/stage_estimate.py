"""Predicted stage times for any served model, including the tiny ones that stand in for a family.

`predict_stage_s` asks the cost model for the model itself, then for the real family it stands
in for (`ModelSpec.profile_model`), and only without a cost model falls back to a rough analytic
estimate. The emulated executors sleep on it; the greedy policy, admission control and the
serve controller's default SLOs plan on it.
"""
from __future__ import annotations

from typing import Any

from trident_rs.errors import TridentError
from trident_rs.models.spec import get_spec
from trident_rs.policy.types import Shape, Stage


def default_cost_model() -> Any:
    """The shared cost model (shipped profiles), or None when it or its profiles are missing."""
    try:
        from trident_rs.policy.cost_model import CostModel

        return CostModel.default()
    except (ImportError, TridentError):
        return None


def fallback_stage_time(model: str, stage: Stage, shape: Shape, width: int, batch: int, steps: int) -> float:
    """A rough analytic stand-in used only when no cost model is installed (seconds)."""
    spec = get_spec(model)
    tokens = spec.tokens(shape.height, shape.width, shape.frames)
    if stage == "encode":
        return 0.02 * batch
    if stage == "decode":
        return 2e-7 * shape.pixels * batch
    per_step = (2e-5 * tokens + 4e-10 * tokens**2) * batch
    return steps * per_step / (width ** 0.85)


def predict_stage_s(cost: Any, model: str, stage: Stage, shape: Shape, width: int = 1,
                    batch: int = 1, steps: int = 1) -> float:
    """`cost.stage_time` for the model (or the real family it stands in for), else the fallback."""
    if cost is not None:
        spec = get_spec(model)
        for name in dict.fromkeys((model, spec.profile_model or spec.family)):
            try:
                return float(cost.stage_time(name, stage, shape, width=width, batch=batch, steps=steps))
            except (KeyError, ValueError):  # ProfileError is a ValueError
                continue
    return fallback_stage_time(model, stage, shape, width, batch, steps)
