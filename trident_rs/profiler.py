"""Measure real stage latency and peak memory on this device, into the profile format.

For each requested shape (and batch size) the profiler chains the three stage executors
(`build_executor(kind, model, stage)`): encode -> diffuse -> decode, `warmup` untimed rounds then
`repeats` timed ones (round-robin over shapes, so that load swings on a shared machine hit
every shape alike; encode and decode samples from every diffuse width are pooled), and records the median wall time of each stage (diffuse divided by the
number of steps: the format stores diffuse latency per step).

Peak memory per stage:
- CUDA: `torch.cuda.max_memory_allocated()` over the stage call (weights + activations).
- CPU: the stage's weights (parameter and buffer bytes of its pipeline's modules) plus the
  largest rise of the process's resident set size (psutil, sampled every millisecond by a
  thread) during the call. RSS is coarse: memory freed earlier and reused does not show, so
  treat CPU figures as lower bounds on activations.

Widths > 1 pass `width=k` to the executor factory: that works once an executor kind accepts it.
"""
from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from trident_rs.errors import ProfileError, TridentError
from trident_rs.executors.base import StageExecutor, StagePayload, build_executor
from trident_rs.models.spec import get_spec
from trident_rs.policy.profile_format import Hardware, Profile, ProfilePoint
from trident_rs.request import GenerationParams
from trident_rs.vocab import Shape

GB = 1e9
PROMPT = "a lighthouse on a cliff at sunset, detailed oil painting"


@dataclass(frozen=True)
class ProfileSpec:
    """What to profile."""

    model: str
    shapes: list[Shape]
    steps: int = 4
    warmup: int = 1
    repeats: int = 3
    widths: tuple[int, ...] = (1,)  # diffuse widths; encode/decode run at width 1
    batches: tuple[int, ...] = (1,)
    executor_kind: str = "diffusers"
    executor_options: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        spec = get_spec(self.model)
        if not self.shapes:
            raise ProfileError("no shapes to profile")
        for s in self.shapes:
            spec.validate(height=s.height, width=s.width, frames=s.frames, steps=self.steps)
        for name, values in (("widths", self.widths), ("batches", self.batches)):
            if not values or any(v < 1 for v in values):
                raise ProfileError(f"{name} must be positive integers, got {values}")
        if self.warmup < 0 or self.repeats < 1:
            raise ProfileError(f"need warmup >= 0 and repeats >= 1, got {self.warmup}, {self.repeats}")


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def hardware() -> Hardware:
    """The device the profiler measures: the GPU, or the CPU and its RAM."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return Hardware(name=props.name, memory_gb=props.total_memory / GB)
    import psutil

    cpu = platform.processor() or platform.machine()
    return Hardware(name=f"cpu {cpu} ({os.cpu_count()} cores)", memory_gb=psutil.virtual_memory().total / GB)


def weight_bytes(executor: StageExecutor) -> int:
    """Bytes of parameters and buffers of the torch modules the executor's pipeline holds."""
    import torch

    pipe = getattr(executor, "pipe", None)
    modules = [m for m in getattr(pipe, "components", {}).values() if isinstance(m, torch.nn.Module)]
    return sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])


@contextmanager
def peak_memory(base_bytes: int) -> Iterator[list[float]]:
    """Yields a one-element list that holds the stage's peak memory in GB once the block exits."""
    import torch

    out: list[float] = [0.0]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        yield out
        torch.cuda.synchronize()
        out[0] = torch.cuda.max_memory_allocated() / GB
        return
    import psutil

    proc, stop, peak = psutil.Process(), threading.Event(), [0]
    start_rss = proc.memory_info().rss

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            stop.wait(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], proc.memory_info().rss)
        out[0] = (base_bytes + max(0, peak[0] - start_rss)) / GB


def _timed(executor: StageExecutor, batch: list[StagePayload], base_bytes: int) -> tuple[list[StagePayload], float, float]:
    import torch

    with peak_memory(base_bytes) as mem:
        start = time.perf_counter()
        out = executor.run(batch)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    return out, elapsed, mem[0]


def profile_model(spec: ProfileSpec, progress: bool = True,
                  on_point: Callable[[ProfilePoint], None] | None = None) -> Profile:
    """Run the measurements of `spec` and return them as a `Profile` (kind 'measured')."""
    spec.check()
    from tqdm import tqdm

    device = _device()
    options = {"device": device, **spec.executor_options}

    def make(stage: str, width: int = 1) -> StageExecutor:
        extra = {"width": width} if width > 1 else {}
        try:
            return build_executor(spec.executor_kind, spec.model, stage, **options, **extra)
        except TridentError:
            raise
        except Exception as e:  # a backend that cannot build this stage/width here
            raise ProfileError(f"cannot build {spec.executor_kind} executor for {spec.model} {stage} "
                               f"(width {width}): {type(e).__name__}: {e}") from e

    encode, decode = make("encode"), make("decode")
    diffusers_by_width = {w: make("diffuse", w) for w in spec.widths}
    weights = {id(x): weight_bytes(x) for x in (encode, decode, *diffusers_by_width.values())}
    rounds = spec.warmup + spec.repeats
    total = len(spec.shapes) * len(spec.batches) * len(spec.widths) * rounds
    source = f"trident profile ({spec.executor_kind}, {device}, median of {spec.repeats}, {spec.steps} steps)"
    cases = [(shape, b, w) for shape in spec.shapes for b in spec.batches for w in spec.widths]
    samples: dict[tuple, list[tuple[float, float]]] = {}
    bar = tqdm(total=total, desc=f"profile {spec.model}", unit="run", disable=not progress)
    for r in range(rounds):  # round-robin over cases, so load swings hit every case alike
        for shape, b, w in cases:
            batch = [StagePayload(GenerationParams(
                model=spec.model, prompt=PROMPT, height=shape.height, width=shape.width,
                num_frames=shape.frames, steps=spec.steps, seed=i)) for i in range(b)]
            for stage, executor in (("encode", encode), ("diffuse", diffusers_by_width[w]), ("decode", decode)):
                batch, seconds, memory = _timed(executor, batch, weights[id(executor)])
                if r >= spec.warmup:
                    key = (stage, shape, w if stage == "diffuse" else 1, b)
                    samples.setdefault(key, []).append((seconds, memory))
            bar.update(1)
    points = []
    for (stage, shape, width, b), runs in samples.items():
        seconds = statistics.median(s for s, _ in runs)
        point = ProfilePoint(
            model=spec.model, stage=stage, height=shape.height, width=shape.width, frames=shape.frames,
            width_gpus=width, batch=b, latency_s=max(seconds / (spec.steps if stage == "diffuse" else 1), 1e-9),
            memory_gb=max(m for _, m in runs), kind="measured", source="profiler")
        points.append(point)
        if on_point:
            on_point(point)
    bar.close()
    return Profile(hardware=hardware(), description=f"{spec.model} measured by trident_rs.profiler",
                   sources={"profiler": source}, points=points)


__all__ = ["ProfileSpec", "hardware", "peak_memory", "profile_model", "weight_bytes"]
