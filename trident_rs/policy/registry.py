"""Policy names -> factories `(cluster, cost, **options) -> Policy`.

`trident` is `make_trident`: its `placement` option picks the shared pool (default) or the
solver's replica groups (what the Serve runtime runs). `paper` and `trident` are imported
lazily (and skipped with a warning where not installed).
`static-best` is not a policy of its own: the runtime runs every variant in `STATIC_VARIANTS`
(static-pipeline and static-stage, FCFS and EDF, at every width in `STATIC_BEST_WIDTHS`) and
reports the best; `static-best-fcfs` is the best FCFS static-pipeline width, the xDiT-style
baseline the paper compares against. `bound` is analytic (`BoundPolicy.evaluate`).
`tetriserve` and `genserve` are step-level baselines after those papers (diffuse in step
chunks, the degree chosen per chunk; `policy/tetriserve.py`, `policy/genserve.py`).
"""
from __future__ import annotations

import importlib
import sys
from typing import Callable

from trident_rs.errors import ConfigError

STATIC_BEST_WIDTHS = (1, 2, 4, 8)
# (policy, queue order) pairs that static-best sweeps at every width
STATIC_VARIANTS = (("static-pipeline", "fcfs"), ("static-pipeline", "edf"),
                   ("static-stage", "fcfs"), ("static-stage", "edf"))

# name -> (module, class)
_FACTORIES: dict[str, tuple[str, str]] = {
    "static-pipeline": ("trident_rs.policy.baselines", "StaticPipelinePolicy"),
    "static-best": ("trident_rs.policy.baselines", "StaticPipelinePolicy"),
    "static-best-fcfs": ("trident_rs.policy.baselines", "StaticPipelinePolicy"),
    "dynamic-pipeline": ("trident_rs.policy.baselines", "DynamicPipelinePolicy"),
    "static-stage": ("trident_rs.policy.baselines", "StaticStagePolicy"),
    "paper": ("trident_rs.policy.paper", "PaperPolicy"),
    "trident": ("trident_rs.policy.trident", "make_trident"),
    "bound": ("trident_rs.policy.bound", "BoundPolicy"),
    "tetriserve": ("trident_rs.policy.tetriserve", "TetriServePolicy"),
    "genserve": ("trident_rs.policy.genserve", "GenServePolicy"),
    "chunk-script": ("trident_rs.policy.scripted", "ChunkScriptPolicy"),  # a fixed chunk path (tests, demos)
}
ANALYTIC = frozenset({"bound"})  # evaluated, not simulated
SWEPT = frozenset({"static-best", "static-best-fcfs"})  # run at every width (and variant), best reported


def policy_names() -> list[str]:
    return list(_FACTORIES)


def factory(name: str) -> Callable | None:
    """The policy class for `name`, or None (with a warning on stderr) if its module is missing."""
    if name not in _FACTORIES:
        raise ConfigError(f"unknown policy {name!r}; known: {', '.join(_FACTORIES)}")
    module, cls = _FACTORIES[name]
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as e:
        print(f"warning: policy {name!r} is not available ({e}); skipped", file=sys.stderr)
        return None


def available_policies() -> list[str]:
    """Names whose factory imports."""
    return [n for n in _FACTORIES if factory(n) is not None]


def make_policy(name: str, cluster, cost, **options):
    """Build policy `name`; raises ConfigError if it is unknown or not installed."""
    cls = factory(name)
    if cls is None:
        raise ConfigError(f"policy {name!r} is not available")
    return cls(cluster, cost, **options)
