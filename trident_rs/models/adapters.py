"""LoRA adapters on one stage's diffusers pipeline: loaded on demand, kept in an LRU, switched per batch.

A stage pipeline holds only its stage's modules, so an adapter is loaded only into the LoRA-loadable
modules that are here (`pipe._lora_loadable_modules` that are not None): the transformer (or UNet)
on a diffuse replica, the text encoders on an encode one, nothing on decode. An adapter with no
weights for this stage is remembered as such and costs nothing afterwards.

`AdapterCache.activate(lora)` makes exactly the request's adapters active with its scales
(`set_adapters`), loading the missing ones (`load_lora_weights`, evicting the least recently used
beyond `slots` with `delete_adapters`). A request without adapters runs with every LoRA layer
disabled (`disable_lora`): its output equals the base pipeline's. Load and unload times are
measured (`AdapterStats`) and logged.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from trident_rs.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass
class AdapterStats:
    """What one replica's adapter cache did: counts, and seconds spent loading and unloading."""

    loads: int = 0
    hits: int = 0
    evictions: int = 0
    load_s: float = 0.0
    unload_s: float = 0.0
    last_load_s: float = 0.0
    last_unload_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["mean_load_s"] = self.load_s / self.loads if self.loads else 0.0
        out["mean_unload_s"] = self.unload_s / self.evictions if self.evictions else 0.0
        return out


def stage_modules(pipe: Any) -> list[str]:
    """The LoRA-loadable modules this (stage) pipeline holds."""
    return [m for m in getattr(type(pipe), "_lora_loadable_modules", ()) if getattr(pipe, m, None) is not None]


def read_lora(pipe: Any, source: str, modules: Sequence[str]) -> dict[str, Any]:
    """The adapter's weights (diffusers' key format) that belong to `modules`."""
    state = type(pipe).lora_state_dict(source)
    state = state[0] if isinstance(state, tuple) else state
    return {k: v for k, v in state.items() if k.split(".", 1)[0] in modules}


class AdapterCache:
    """Up to `slots` adapters loaded on `pipe`, least recently used evicted first."""

    def __init__(self, pipe: Any, sources: Mapping[str, str], slots: int = 4):
        if slots < 1:
            raise ConfigError(f"lora_slots must be at least 1, got {slots}")
        self.pipe, self.sources, self.slots = pipe, dict(sources), slots
        self.modules = stage_modules(pipe)
        self.loaded: OrderedDict[str, None] = OrderedDict()  # adapters with weights here, LRU order
        self.elsewhere: set[str] = set()  # adapters with no weights for this stage
        self.active: tuple[tuple[str, float], ...] | None = ()  # what the pipeline runs with; None: unknown
        self.stats = AdapterStats()

    def holds(self) -> list[str]:
        """The adapters loaded here, least recently used first."""
        return list(self.loaded)

    def activate(self, lora: Sequence[Any]) -> float:
        """Make exactly `lora` (LoraRef-likes: name, scale) active; the seconds spent loading."""
        names = [r.name for r in lora]
        if len(names) > self.slots:
            raise ConfigError(f"{len(names)} adapters in one request but lora_slots is {self.slots}")
        took = sum(self._ensure(n, keep=names) for n in names)
        want = tuple((r.name, float(r.scale)) for r in lora if r.name in self.loaded)
        if want == self.active:
            return took
        if not want:
            self.pipe.disable_lora()
        else:
            self.pipe.enable_lora()
            self.pipe.set_adapters([n for n, _ in want], [s for _, s in want])
        self.active = want
        return took

    def _ensure(self, name: str, keep: Sequence[str]) -> float:
        if name in self.elsewhere:
            return 0.0
        if name in self.loaded:
            self.loaded.move_to_end(name)
            self.stats.hits += 1
            return 0.0
        if name not in self.sources:
            raise ConfigError(f"LoRA adapter {name!r} is not in this replica's config (loras)")
        if not self.modules:  # decode: no LoRA-loadable module here
            self.elsewhere.add(name)
            return 0.0
        while len(self.loaded) >= self.slots:
            self._evict(next(n for n in self.loaded if n not in keep))
        t0 = time.perf_counter()
        weights = read_lora(self.pipe, self.sources[name], self.modules)
        if not weights:
            self.elsewhere.add(name)
            return 0.0
        self._load(name, weights)
        self.active = None  # loading may change which adapters are active
        took = time.perf_counter() - t0
        self.loaded[name] = None
        self.stats.loads += 1
        self.stats.load_s += took
        self.stats.last_load_s = took
        logger.info("loaded LoRA %s into %s in %.3f s", name, "+".join(self.modules), took)
        return took

    def _load(self, name: str, weights: dict[str, Any]) -> None:
        """Into the denoiser through the pipeline (its text encoders are absent here); into each
        text encoder of an encode pipeline through the pipeline class's text-encoder loader (its
        `load_lora_weights` would also load into the absent transformer)."""
        if any(not m.startswith("text_encoder") for m in self.modules):
            self.pipe.load_lora_weights(weights, adapter_name=name)
            return
        for m in self.modules:
            if any(k.startswith(m + ".") for k in weights):
                type(self.pipe).load_lora_into_text_encoder(weights, network_alphas=None, text_encoder=getattr(self.pipe, m),
                                                            prefix=m, adapter_name=name, _pipeline=self.pipe)

    def _evict(self, name: str) -> None:
        t0 = time.perf_counter()
        self.pipe.delete_adapters(name)
        took = time.perf_counter() - t0
        del self.loaded[name]
        self.active = None
        self.stats.evictions += 1
        self.stats.unload_s += took
        self.stats.last_unload_s = took
        logger.info("unloaded LoRA %s in %.3f s", name, took)

    def snapshot(self) -> dict[str, Any]:
        return {"loaded": self.holds(), "slots": self.slots, **self.stats.to_dict()}
