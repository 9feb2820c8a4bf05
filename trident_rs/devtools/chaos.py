"""Fault injection for tests and benchmarks: kill Serve replicas of a running app.

Serve names each replica actor `SERVE_REPLICA::<app>#<deployment>#<id>` in the `serve`
namespace; killing one (`no_restart`) is what a crashed process or a lost node looks like to
its callers. Serve's controller notices and starts a replacement to keep the target count.
"""
from __future__ import annotations

import random
from collections.abc import Iterable

SERVE_NAMESPACE = "serve"


def replica_actors(app: str, deployment: str) -> list[str]:
    """Names of the live replica actors of `deployment` in `app`."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a.get("namespace") == SERVE_NAMESPACE and a["name"].startswith(prefix))


def kill_replica(app: str, deployments: str | Iterable[str], rng: random.Random | None = None) -> str | None:
    """Kill one replica, chosen uniformly (by `rng`) among the live replicas of `deployments`;
    its name, or None if none is alive."""
    import ray

    deps = [deployments] if isinstance(deployments, str) else list(deployments)
    names = [n for d in deps for n in replica_actors(app, d)]
    if not names:
        return None
    name = (rng or random.Random()).choice(names)
    try:
        ray.kill(ray.get_actor(name, namespace=SERVE_NAMESPACE), no_restart=True)
    except ValueError:  # it went away between listing and killing
        return None
    return name
