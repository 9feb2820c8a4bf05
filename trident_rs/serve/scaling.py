"""How replica counts follow the placement plan: a custom Serve autoscaling policy.

The controller publishes the plan's replica count per deployment into Ray's internal KV store
(`publish_counts`); every stage deployment's `autoscaling_config.policy.policy_function` is
`follow_plan`, which Serve's own controller calls on each autoscaling tick (~0.1 s) and which
simply returns the published count. Serve then starts and drains replicas as it always does
(graceful shutdown, placement groups, min/max bounds); upscale/downscale delays are set to 0.

Why this and not the external scaler REST API: the external scaler needs the dashboard (and its
address and port) reachable from the controller replica and cannot be mixed with any
autoscaling config in the application; a KV read inside Serve's control loop needs neither,
works under `serve run` on a bare laptop and under KubeRay alike, and re-shapes as fast.
"""
from __future__ import annotations

import json
from typing import Any

KV_NAMESPACE = "trident_rs"


def _key(app_name: str | None, deployment: str) -> bytes:
    return f"replicas/{app_name or 'default'}/{deployment}".encode()


def publish_counts(app_name: str, counts: dict[str, int]) -> None:
    """Record the desired replica count of each deployment (called by the controller)."""
    from ray.experimental.internal_kv import _internal_kv_put

    for deployment, n in counts.items():
        _internal_kv_put(_key(app_name, deployment), json.dumps(int(n)).encode(),
                         overwrite=True, namespace=KV_NAMESPACE)


def read_count(app_name: str | None, deployment: str) -> int | None:
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(_key(app_name, deployment), namespace=KV_NAMESPACE)
    return None if raw is None else int(json.loads(raw))


def follow_plan(ctx: Any) -> tuple[int, dict]:
    """Serve custom autoscaling policy: the count the controller published, else keep the target."""
    try:
        n = read_count(ctx.app_name, ctx.deployment_name)
    except Exception:  # KV briefly unavailable: never let scaling crash Serve's control loop
        n = None
    return (ctx.target_num_replicas if n is None else n), {}


def autoscaling_config(initial: int, max_replicas: int) -> dict[str, Any]:
    """The `autoscaling_config` every stage deployment gets."""
    return {
        "min_replicas": 0,
        "initial_replicas": initial,
        "max_replicas": max(max_replicas, initial, 1),
        "upscale_delay_s": 0.0,
        "downscale_delay_s": 0.0,
        "policy": {"policy_function": f"{__name__}:follow_plan"},
    }
