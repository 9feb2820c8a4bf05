"""LoRA adapters for simulated requests: a share of a workload's requests each get one adapter,
drawn from `n` adapters with Zipf popularity (adapter k, from 1, has weight 1 / k**s)."""
from __future__ import annotations

import dataclasses
import random

from trident_rs.policy.types import Request


def adapter_names(n: int) -> list[str]:
    return [f"lora-{k:02d}" for k in range(n)]


def with_adapters(requests: list[Request], n: int = 50, share: float = 0.8, zipf_s: float = 1.0,
                  seed: int = 0, scale: float = 1.0) -> list[Request]:
    """`requests` with one adapter for each request with probability `share` (Zipf-popular among
    `n`), none for the others; deterministic for a seed."""
    if n < 1 or not 0.0 <= share <= 1.0:
        raise ValueError(f"need n >= 1 adapters and a share in [0, 1], got {n}, {share}")
    rng = random.Random(seed)
    names = adapter_names(n)
    weights = [1.0 / (k ** zipf_s) for k in range(1, n + 1)]
    out = []
    for r in requests:
        if rng.random() < share:
            (name,) = rng.choices(names, weights)
            r = dataclasses.replace(r, adapters=(name,), adapter_scales=(scale,))
        out.append(r)
    return out
