"""The ground floor: names every layer shares. Pure Python; imports nothing of trident_rs.

- `Stage`, `STAGES`: the three stages, in request order.
- `Shape`: what the cost model keys on (height, width, frames); its text form `"h-w-f"`
  (`Shape.key` / `Shape.parse`) is for files and display only, calls pass `Shape` itself.
- `DeploymentKey(stage, width)`: one Ray Serve deployment, e.g. `diffuse-w4` (`name` / `parse`).
  Pipeline-level groups run several stages on the same GPUs: their stage is `"encode+diffuse+decode"`.
- `percentile(values, q)`: the one percentile definition (linear interpolation between closest
  ranks, numpy's default), used by the simulator, the serve status and the benchmarks.
- `error_body(...)`: the OpenAI-style error body every HTTP error answers with.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Literal

Stage = Literal["encode", "diffuse", "decode"]
STAGES: tuple[Stage, ...] = ("encode", "diffuse", "decode")


@dataclass(frozen=True, order=True)
class Shape:
    """What the cost model keys on: output height, width and frame count."""

    height: int
    width: int
    frames: int = 1

    @property
    def key(self) -> str:
        return f"{self.height}-{self.width}-{self.frames}"

    @property
    def pixels(self) -> int:
        return self.height * self.width * self.frames

    @classmethod
    def parse(cls, key: str) -> "Shape":
        h, w, *f = (int(x) for x in key.split("-"))
        return cls(h, w, f[0] if f else 1)


_WIDTH_SEP = "-w"


@dataclass(frozen=True, order=True)
class DeploymentKey:
    """One Serve deployment: `stage` at `width` GPUs per replica; `name` is e.g. `diffuse-w4`."""

    stage: str  # a Stage, or stages joined by "+" for a pipeline-level group
    width: int

    @classmethod
    def of(cls, stages: Iterable[str], width: int) -> "DeploymentKey":
        """The key of a group that runs `stages` together (one stage: a stage-level deployment)."""
        return cls("+".join(stages), width)

    @property
    def name(self) -> str:
        return f"{self.stage}{_WIDTH_SEP}{self.width}"

    @property
    def stages(self) -> tuple[str, ...]:
        return tuple(self.stage.split("+"))

    @classmethod
    def parse(cls, name: str) -> "DeploymentKey":
        """`"diffuse-w4"` -> DeploymentKey("diffuse", 4); ValueError for anything else."""
        stage, sep, width = str(name).rpartition(_WIDTH_SEP)
        if not sep or not stage or not width.isdigit():
            raise ValueError(f"not a deployment name: {name!r} (expected '<stage>-w<width>')")
        return cls(stage, int(width))

    def __str__(self) -> str:
        return self.name


def percentile(values: Iterable[float], q: float) -> float:
    """The `q`-th percentile (0..100) of `values`, interpolating linearly between the closest
    ranks (numpy's default method); NaN when there are none. A percentile that interpolates
    towards an infinite value is infinite (numpy's lerp would give NaN there)."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * (q / 100.0)
    lo = math.floor(pos)
    a, b, t = xs[lo], xs[min(lo + 1, len(xs) - 1)], pos - lo
    if math.isinf(b) and (t > 0 or math.isinf(a)):
        return b
    # numpy's lerp, so figures equal np.percentile's to the last bit
    return float(b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t)


def error_body(message: str, kind: str, status: int, param: str | None = None) -> dict:
    """The OpenAI-style error body: `{"error": {"message", "type", "param", "code"}}`."""
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}
