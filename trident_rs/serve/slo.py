"""A request's default SLO, one definition for admission (the ingress) and dispatch (the controller).

The policy's rule (`trident_rs.policy.slo.slo_seconds`: 1.1 × round(scale × best-width diffuse
time) + 2 s) on the cost model's real-time predictions, times the emulated clock's `time_scale`.
Without a cost model or a profile for the model: `scale` × the sum of the stage times at width 1
(the fallback estimate), times the same clock scale. A request's own `slo_ms` overrides both.
"""
from __future__ import annotations

from typing import Any

from trident_rs.models.spec import get_spec
from trident_rs.policy.stage_estimate import predict_stage_s
from trident_rs.vocab import STAGES, Shape


def clock_scale(cfg: Any) -> float:
    """How much faster than real time the served stages run (emulated executors' `time_scale`)."""
    return cfg.time_scale if cfg.executor == "emulated" else 1.0


def default_slo_s(cost: Any, model: str, shape: Shape, steps: int, *, scale: float, clock: float = 1.0) -> float:
    """Seconds from arrival to deadline of a request that sent no `slo_ms`.

    `cost`: the *unscaled* cost model (or None); `clock`: `clock_scale(cfg)`."""
    try:
        from trident_rs.policy.slo import slo_seconds

        if cost is None:
            raise LookupError("no cost model")
        return clock * float(slo_seconds(cost, get_spec(model).profile_model or model, shape, steps, scale=scale))
    except Exception:  # noqa: BLE001 - no cost model or no profile for this model: the fallback estimate
        total = sum(predict_stage_s(cost, model, s, shape, 1, 1, steps) for s in STAGES)
        return scale * total * clock


def request_slo_s(cost: Any, params: Any, *, scale: float, clock: float = 1.0) -> float:
    """The request's own `slo_ms`, else the default."""
    if getattr(params, "slo_ms", None):
        return params.slo_ms / 1000.0
    return default_slo_s(cost, params.model, params.shape, params.steps or 1, scale=scale, clock=clock)
