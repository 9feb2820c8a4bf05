"""Predicted latency and peak memory of (model, stage, shape, width, batch), from profiles.

Backed by profile files (`profile_format`): exact at profiled points, and between/beyond them a
monotone curve over the diffuse token count (`token_curve`), one curve per (model, stage, GPU
width, batch). Pure Python + numpy; cached, so the dispatcher can call `predict` in its hot path.

Model names: a profile entry under the exact name wins; otherwise a registry model is looked up
under its `ModelSpec.profile_model` (or family), e.g. "tiny-sd3" -> the "sd3" GPU table.

Batching (when no point was profiled at that batch size): with the fitted per-call fixed cost
c0 of the curve (its intercept), a batch of b same-shape requests costs
    latency(b) = c0 + b * (latency(1) - c0),   memory(b) = m0 + b * (memory(1) - m0)
so b x at large sizes, and much less at small ones where the fixed cost (kernel launches,
weights streaming; weights for memory) dominates. A stage whose profile does not vary with
size (encode) shows no fixed cost, so it is taken as linear in b (c0 = 0).

Sizes profiled at another GPU width only (`_across_widths`): the width's curve also goes through
t_w(T) = t_v(T) * s(T) for each token count T measured at a width v but not at w, where s is the
speedup t_w / t_v at the sizes both widths measured, interpolated in log T (held constant beyond
them) and v the nearest measured width in log2 (geometric mean on a tie). Why: the speedup between
widths varies slowly with size, whereas the time itself has shape-specific parts that no token
curve sees from other sizes, least of all below the smallest one (FLUX per step doubles from 128²
to 256²; SD3 is flat there). Leave-one-out on the shipped L20 table (benchmarks/cost_model_fit.py):
median error 8.1/10.6/8.0% -> 1.6/6.0/2.8% for CogVideoX/FLUX/SD3, 1.0 -> 3.0% for HunyuanVideo.
Measured points stay exact (imputed points only fill holes); the curves stay monotone.
"""
from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trident_rs.errors import ConfigError, InvalidRequestError, ProfileError, UnknownModelError
from trident_rs.models.families import get_family
from trident_rs.models.spec import REGISTRY, get_spec, model_names
from trident_rs.policy.profile_format import Profile, ProfilePoint, load_profile
from trident_rs.policy.token_curve import TokenCurve
from trident_rs.policy.types import STAGES, Shape

DEFAULT_PROFILE = "l20.json"
# Host <-> GPU bandwidth for offloaded weights: PCIe 4.0 x16 moves ~20 GB/s in practice.
HOST_LINK_GBPS = 20.0
# Image edits VAE-encode their input on the encode stage (`trident_rs.models.image_edit`). The
# SD3/FLUX VAE's encoder does 0.437x its decoder's FLOPs at every size (counted with
# torch.utils.flop_counter on the architecture: 67.7 vs 155.0 GFLOPs at 128x128, 270.8 vs 620.2 at
# 256x256), so an edit's encode adds that share of the model's decode time at the shape.
VAE_ENCODE_SHARE = 0.44
# Encode replicas of families that make edits also hold that VAE: 83.8M parameters (34.3M encoder,
# 49.5M decoder) in bf16.
EDIT_VAE_GB = 83.8e6 * 2 / 1e9


class DoesNotFitError(ConfigError):
    """No profiled width of a stage fits in the given GPU memory."""


@dataclass(frozen=True)
class StageCost:
    """Predicted cost of one stage call. Diffuse latency is PER STEP; memory is per GPU."""

    latency_s: float
    memory_gb: float


def token_count(model: str, shape: Shape) -> int:
    """Diffuse sequence length of `shape` for a profile/registry model (pixels / 256 if unknown)."""
    spec = REGISTRY.get(model)
    if spec is not None:
        return max(1, spec.tokens(shape.height, shape.width, shape.frames))
    return max(1, shape.pixels // 256)


@dataclass(frozen=True)
class _Series:
    """The points of one (model, stage, width, batch) and the curves fitted through them."""

    exact: dict  # Shape -> ProfilePoint
    latency: TokenCurve
    memory: TokenCurve | None


def _build_series(model: str, points: list[ProfilePoint], imputed: dict[int, float] | None = None) -> _Series:
    """Curves through `points`; the latency curve also through `imputed` {tokens: seconds}."""
    imputed = imputed or {}
    tokens = [token_count(model, p.shape) for p in points] + list(imputed)
    latency = TokenCurve.fit(tokens, [p.latency_s for p in points] + list(imputed.values()))
    tokens = tokens[: len(points)]
    with_mem = [(t, p.memory_gb) for t, p in zip(tokens, points) if p.memory_gb]
    memory = TokenCurve.fit(*zip(*with_mem)) if with_mem else None
    return _Series({p.shape: p for p in points}, latency, memory)


def _across_widths(measured: dict[int, dict[int, float]]) -> dict[int, dict[int, float]]:
    """{width: {tokens: log latency}} measured -> {width: {tokens: latency}} at token counts that
    another width measured and this one did not: that width's time x the interpolated speedup
    (see the module docstring). Only measured points are used, so the result is order-free."""
    out: dict[int, dict[int, float]] = {}
    for w, own in measured.items():
        imputed: dict[int, float] = {}
        for t in sorted(set().union(*measured.values()) - own.keys()):
            guesses = []  # (log2 distance of the width, log of the guess)
            for v, other in measured.items():
                common = sorted(own.keys() & other.keys())
                if v == w or t not in other or not common:
                    continue
                log_speedup = np.interp(math.log(t), np.log(common), [own[c] - other[c] for c in common])
                guesses.append((abs(math.log2(v / w)), other[t] + float(log_speedup)))
            if guesses:
                nearest = min(d for d, _ in guesses)
                imputed[t] = math.exp(float(np.mean([g for d, g in guesses if d == nearest])))
        out[w] = imputed
    return out


class CostModel:
    """Stage cost predictions from one or more profiles (later profiles override earlier points)."""

    def __init__(self, profiles: list[Profile] | tuple[Profile, ...]):
        if not profiles:
            raise ProfileError("a cost model needs at least one profile")
        self.profiles = tuple(profiles)
        points: dict[tuple, ProfilePoint] = {}
        for profile in self.profiles:
            for p in profile.points:
                points[p.key] = p
        grouped: dict[tuple[str, str, int, int], list[ProfilePoint]] = {}
        for p in points.values():
            grouped.setdefault((p.model, p.stage, p.width_gpus, p.batch), []).append(p)
        measured: dict[tuple[str, str, int], dict[int, dict[int, list[float]]]] = {}
        for (model, stage, w, b), pts in grouped.items():
            by_tokens = measured.setdefault((model, stage, b), {}).setdefault(w, {})
            for p in pts:
                by_tokens.setdefault(token_count(model, p.shape), []).append(math.log(p.latency_s))
        imputed: dict[tuple[str, str, int, int], dict[int, float]] = {}
        for (model, stage, b), by_width in measured.items():  # repeated token counts: geometric mean
            logs = {w: {t: sum(v) / len(v) for t, v in d.items()} for w, d in by_width.items()}
            for w, extra in _across_widths(logs).items():
                imputed[(model, stage, w, b)] = extra
        self._series = {k: _build_series(k[0], v, imputed.get(k)) for k, v in grouped.items()}
        self._models = frozenset(k[0] for k in grouped)
        self._cache: dict[tuple, StageCost] = {}
        self.latency_scale = 1.0

    def scaled(self, latency_scale: float) -> "CostModel":
        """A copy whose latencies are multiplied by `latency_scale` (memory unchanged).

        For runtimes whose clock runs at a time scale, e.g. emulated executors that sleep for
        the predicted time x 0.05: the policy must plan on the same scaled times.
        """
        if not latency_scale > 0:
            raise InvalidRequestError("latency_scale", f"must be positive, got {latency_scale!r}")
        other = copy.copy(self)
        other._cache = {}
        other.latency_scale = self.latency_scale * latency_scale
        return other

    # ----- construction -------------------------------------------------------------------
    @classmethod
    def default(cls) -> "CostModel":
        """The shipped GPU profile (NVIDIA L20 48 GB), loaded once per process."""
        return _default_model()

    @classmethod
    def from_files(cls, *paths: str | Path) -> "CostModel":
        """Load profile JSON files; a point in a later file replaces the same point in an earlier one."""
        return cls([load_profile(p) for p in paths])

    @staticmethod
    def default_path() -> Path:
        return Path(__file__).resolve().parent.parent / "profiles" / DEFAULT_PROFILE

    @property
    def gpu_memory_gb(self) -> float:
        return self.profiles[0].hardware.memory_gb

    @property
    def hardware(self) -> str:
        return self.profiles[0].hardware.name

    def models(self) -> list[str]:
        return sorted(self._models)

    # ----- lookups ------------------------------------------------------------------------
    def profile_model(self, model: str) -> str:
        """The profile entry that stands for `model` (itself, or its spec's profile model)."""
        if model in self._models:
            return model
        if not isinstance(model, str) or model not in REGISTRY:
            raise UnknownModelError(str(model), sorted(set(model_names()) | self._models))
        spec = get_spec(model)
        for name in (spec.profile_model, spec.family):
            if name and name in self._models:
                return name
        raise ProfileError(f"no profile data for model {model!r} (profiles cover {', '.join(self.models())})")

    def shapes(self, model: str, stage: str = "diffuse") -> list[Shape]:
        """The shapes profiled for `stage` of `model` (any width), sorted."""
        _check_stage(stage)
        pmodel = self.profile_model(model)
        return sorted({shape for (m, s, _w, _b), series in self._series.items() if m == pmodel and s == stage
                       for shape in series.exact})

    def _profiled_widths(self, pmodel: str, stage: str) -> tuple[int, ...]:
        return tuple(sorted({w for (m, s, w, b) in self._series if m == pmodel and s == stage and b == 1}))

    def widths(self, model: str, stage: str) -> tuple[int, ...]:
        """GPU widths with data for this stage, limited to those the model's spec allows."""
        _check_stage(stage)
        pmodel = self.profile_model(model)
        widths = self._profiled_widths(pmodel, stage)
        if model in REGISTRY:
            allowed = set(get_spec(model).widths.get(stage, widths))
            widths = tuple(w for w in widths if w in allowed) or widths[:1]
        if not widths:
            raise ProfileError(f"no profile data for {model!r} stage {stage!r}")
        return widths

    # ----- predictions --------------------------------------------------------------------
    def predict(self, model: str, stage: str, shape: Shape, width: int = 1, batch: int = 1) -> StageCost:
        """Latency (per step for diffuse) and peak memory per GPU of one stage call."""
        key = (model, stage, shape, width, batch)
        cost = self._cache.get(key)
        if cost is None:
            cost = self._predict(model, stage, shape, width, batch)
            if self.latency_scale != 1.0:
                cost = StageCost(cost.latency_s * self.latency_scale, cost.memory_gb)
            self._cache[key] = cost
        return cost

    def _predict(self, model: str, stage: str, shape: Shape, width: int, batch: int) -> StageCost:
        _check_stage(stage)
        if not isinstance(shape, Shape):
            raise InvalidRequestError("shape", f"expected a Shape, got {type(shape).__name__}")
        for name, v in (("width", width), ("batch", batch)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InvalidRequestError(name, f"must be a positive integer, got {v!r}")
        pmodel = self.profile_model(model)
        if model in REGISTRY:
            get_spec(model).validate(height=shape.height, width=shape.width, frames=shape.frames)
        elif shape.height < 1 or shape.width < 1 or shape.frames < 1:
            raise InvalidRequestError("shape", f"{shape.key} has a non-positive dimension")
        series = self._series.get((pmodel, stage, width, batch))
        if series is not None:  # profiled at this batch size
            return self._from_series(series, pmodel, shape)
        one = self._series.get((pmodel, stage, width, 1))
        if one is None:
            have = self._profiled_widths(pmodel, stage)
            if not have:
                raise ProfileError(f"no profile data for {model!r} stage {stage!r}")
            raise ProfileError(f"no profile data for {model!r} {stage} at width {width} (have {have})")
        single = self._from_series(one, pmodel, shape)
        if batch == 1:
            return single
        c0 = 0.0 if one.latency.is_constant else min(one.latency.coef[0], single.latency_s)
        m0 = min(one.memory.coef[0], single.memory_gb) if one.memory is not None else 0.0
        return StageCost(c0 + batch * (single.latency_s - c0), m0 + batch * (single.memory_gb - m0))

    @staticmethod
    def _from_series(series: _Series, pmodel: str, shape: Shape) -> StageCost:
        point = series.exact.get(shape)
        tokens = token_count(pmodel, shape)
        latency = point.latency_s if point is not None else series.latency(tokens)
        if point is not None and point.memory_gb is not None:
            memory = point.memory_gb
        else:
            memory = series.memory(tokens) if series.memory is not None else 0.0
        return StageCost(latency, memory)

    def stage_time(self, model: str, stage: str, shape: Shape, width: int = 1, batch: int = 1, steps: int = 1,
                   encode_image: bool = False) -> float:
        """Whole-stage seconds: per-step latency x steps for diffuse, the stage latency otherwise;
        `encode_image` (image edits): encode also VAE-encodes the input image, estimated as
        `VAE_ENCODE_SHARE` of the model's decode time at the shape and batch."""
        latency = self.predict(model, stage, shape, width, batch).latency_s
        if stage == "encode" and encode_image:
            latency += VAE_ENCODE_SHARE * self.predict(model, "decode", shape, 1, batch).latency_s
        return latency * steps if stage == "diffuse" else latency

    def efficiency(self, model: str, shape: Shape, width: int) -> float:
        """Diffuse parallel efficiency (t1 / tk) / k."""
        t1 = self.predict(model, "diffuse", shape, 1).latency_s
        return t1 / self.predict(model, "diffuse", shape, width).latency_s / width

    def best_width(self, model: str, shape: Shape, threshold: float = 0.8,
                   widths: tuple[int, ...] = (1, 2, 4, 8)) -> int:
        """Largest diffuse width (among `widths` with data) whose efficiency is >= threshold."""
        have = set(self.widths(model, "diffuse"))
        best = 1
        for w in sorted(set(widths) & have):
            if self.efficiency(model, shape, w) >= threshold:
                best = w
        return best

    def stage_width(self, model: str, stage: str, width: int) -> int:
        """The widest degree `stage` runs at within a launch of `width` GPUs (encode: 1)."""
        return max([w for w in self.widths(model, stage) if w <= width] or [1])

    def weights_gb(self, model: str, stage: str) -> float:
        """Memory per GPU that a stage's weights hold: its peak at the smallest profiled shape
        (width 1, batch 1). Sequence-parallel ranks each hold a full copy."""
        pmodel = self.profile_model(model)
        key = ("weights", pmodel, stage)
        cached = self._cache.get(key)
        if cached is None:
            series = self._series.get((pmodel, stage, 1, 1))
            if series is None:
                raise ProfileError(f"no width-1 profile data for {model!r} stage {stage!r}")
            mems = [p.memory_gb for p in series.exact.values() if p.memory_gb]
            cached = self._cache[key] = StageCost(0.0, min(mems) if mems else 0.0)
        return cached.memory_gb + (EDIT_VAE_GB if stage == "encode" and _makes_edits(model) else 0.0)

    def launch_memory(self, model: str, stages: tuple[str, ...] | list[str], shape: Shape, width: int,
                      batch: int = 1, offload: tuple[str, ...] = ()) -> float:
        """Peak memory per GPU of one launch running `stages` back to back on `width` GPUs.

        A launch of one stage needs that stage's predicted peak. A launch of several (a
        pipeline-level worker) keeps every stage's weights resident and adds the largest
        stage's activations (peak minus weights): the stages run one after the other, so their
        activations never coexist, but their weights do. A stage in `offload` keeps its weights
        in host memory and loads them only while it runs (diffusers' model CPU offload), so
        they coexist with the resident weights during that stage only."""
        peaks = {s: self.predict(model, s, shape, self.stage_width(model, s, width), batch).memory_gb
                 for s in stages}
        if len(peaks) == 1:
            return next(iter(peaks.values()))
        weights = {s: min(self.weights_gb(model, s), peaks[s]) for s in stages}
        resident = [s for s in stages if s not in offload]
        base = sum(weights[s] for s in resident)
        need = base + max((peaks[s] - weights[s] for s in resident), default=0.0)
        for s in stages:
            if s in offload:
                need = max(need, base + peaks[s])
        return need

    def offload_s(self, model: str, stages: tuple[str, ...] | list[str]) -> float:
        """Seconds a launch spends moving the weights of offloaded `stages` to the GPU and back."""
        return 2.0 * self.weights_load_s(model, stages)

    def weights_load_s(self, model: str, stages: tuple[str, ...] | list[str]) -> float:
        """Seconds to copy the weights of `stages` from host memory to a GPU (one way)."""
        return sum(self.weights_gb(model, s) / HOST_LINK_GBPS for s in stages)

    def pipeline_offload(self, model: str, shape: Shape, width: int, gpu_memory_gb: float,
                         stages: tuple[str, ...] = STAGES) -> tuple[str, ...] | None:
        """How a pipeline-level launch of `stages` fits on `width` GPUs: () if all weights stay
        resident, ("encode",) if the text encoders must be offloaded between requests, None if
        it does not fit either way."""
        for offload in ((), ("encode",)):
            if self.launch_memory(model, stages, shape, width, 1, offload) <= gpu_memory_gb:
                return offload
        return None

    def min_width(self, model: str, stage: str, shape: Shape, gpu_memory_gb: float) -> int:
        """Smallest width of `stage` whose predicted peak memory per GPU fits; DoesNotFitError if none."""
        needs = {}
        for w in self.widths(model, stage):
            needs[w] = self.predict(model, stage, shape, w).memory_gb
            if needs[w] <= gpu_memory_gb:
                return w
        detail = ", ".join(f"w{w}: {m:.1f} GB" for w, m in needs.items())
        raise DoesNotFitError(f"{model} {stage} {shape.key} fits no width in {gpu_memory_gb:g} GB GPUs ({detail})")


def _makes_edits(model: str) -> bool:
    """Whether `model`'s encode replicas hold the VAE for image edits (its family makes edits)."""
    return model in REGISTRY and bool(get_family(get_spec(model).family).stages.edit_pipelines)


def _check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise InvalidRequestError("stage", f"{stage!r} is not one of {', '.join(STAGES)}")


@functools.cache
def _default_model() -> CostModel:
    path = CostModel.default_path()
    if not path.exists():
        raise ProfileError(f"shipped profile {path} is missing (package data not installed?)")
    return CostModel([load_profile(path)])


__all__ = ["CostModel", "DoesNotFitError", "StageCost", "token_count"]
