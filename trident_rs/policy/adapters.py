"""Which LoRA adapters each diffuse replica (group) holds, and what a launch there costs in loads.

A diffuse replica keeps an LRU of `slots` adapters (`trident_rs.models.adapters.AdapterCache`);
a launch whose adapters a replica lacks first loads them. `AdapterResidency` is that LRU per
replica group, driven by what was launched there: the policy mirrors the replicas' own LRUs from
its grants (every grant to a group replays the replica's `activate` of the same adapters, so
the two stay equal as long as a group stays bound to one replica), and the simulator keeps one
as the ground truth. Encode replicas load only text-encoder parts, which are small: the policy
does not route encode by adapter.

`ADAPTER_LOAD_S`: the cost charged per adapter loaded. An estimate, not a measurement: a rank-16
FLUX or SD3 LoRA is 20-80 M parameters (40-160 MB in bf16); reading it from local disk and
injecting it with peft (`load_lora_weights`) takes about a second on a GPU server. The tiny
models here load theirs in ~5-60 ms (benchmarks/RESULTS.md, "Per-request LoRA adapters").
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field

ADAPTER_LOAD_S = 1.0


@dataclass
class AdapterResidency:
    slots: int = 4
    load_s: float = ADAPTER_LOAD_S
    lru: dict[Hashable, OrderedDict] = field(default_factory=dict)
    hits: int = 0  # adapters a launch found loaded
    loads: int = 0  # adapters a launch had to load

    def __post_init__(self) -> None:
        if self.slots < 1 or self.load_s < 0:
            raise ValueError(f"adapter slots must be >= 1 and load_s >= 0, got {self.slots}, {self.load_s}")

    def holds(self, key: Hashable) -> list[str]:
        """The adapters `key` holds, least recently used first."""
        return list(self.lru.get(key, ()))

    def missing(self, key: Hashable, names: Sequence[str]) -> int:
        held = self.lru.get(key, {})
        return sum(1 for n in names if n not in held)

    def load_time(self, key: Hashable, names: Sequence[str]) -> float:
        """Seconds a launch of `names` on `key` spends loading adapters first."""
        return self.missing(key, names) * self.load_s

    def use(self, key: Hashable, names: Sequence[str]) -> int:
        """A launch of `names` runs on `key`: load what is missing (evicting the least recently
        used beyond `slots`) and mark them used. Returns how many were loaded."""
        if not names:
            return 0
        held = self.lru.setdefault(key, OrderedDict())
        loaded = 0
        for n in names:
            if n in held:
                held.move_to_end(n)
                self.hits += 1
                continue
            while len(held) >= self.slots:
                victim = next((v for v in held if v not in names), None)
                if victim is None:
                    break
                del held[victim]
            held[n] = None
            loaded += 1
        self.loads += loaded
        return loaded

    def forget(self, key: Hashable) -> None:
        """`key` is gone (its group was removed): whatever replaces it starts empty."""
        self.lru.pop(key, None)

    def best(self, keys: Iterable[Hashable], names: Sequence[str]) -> Hashable | None:
        """Of `keys` (in order of preference), the first that misses the fewest of `names`."""
        return min(keys, key=lambda k: self.missing(k, names), default=None)

    def hit_rate(self) -> float:
        total = self.hits + self.loads
        return self.hits / total if total else 1.0
