"""`trident profile`: measure stage latency and peak memory on this device into a profile JSON.

    trident profile --model tiny-sd3 --sizes 64x64,128x128 --steps 4 --out prof.json

The file is in trident_rs.policy.profile_format and loads with `CostModel.from_files`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from trident_rs.errors import InvalidRequestError
from trident_rs.vocab import Shape


def parse_sizes(text: str) -> list[Shape]:
    """'64x64,128x96' or '720x1280x33' (height x width [x frames]) -> shapes."""
    shapes = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        parts = item.lower().split("x")
        if len(parts) not in (2, 3) or not all(p.isdigit() for p in parts):
            raise InvalidRequestError("sizes", f"{item!r} is not HEIGHTxWIDTH or HEIGHTxWIDTHxFRAMES")
        shapes.append(Shape(*(int(p) for p in parts)))
    if not shapes:
        raise InvalidRequestError("sizes", "no sizes given")
    return shapes


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="registry model name, e.g. tiny-sd3")
    parser.add_argument("--sizes", required=True, help="comma-separated HxW or HxWxFRAMES, e.g. 64x64,128x128")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per diffuse run (default 4)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds per shape (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per shape; the median is kept (default 3)")
    parser.add_argument("--widths", type=_ints, default=(1,), help="diffuse GPU widths, e.g. 1,2 (default 1)")
    parser.add_argument("--batches", type=_ints, default=(1,), help="batch sizes, e.g. 1,4 (default 1)")
    parser.add_argument("--executor", default="diffusers", help="executor kind (default diffusers)")
    parser.add_argument("--out", type=Path, required=True, help="profile JSON to write")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    from trident_rs.policy.profile_format import save_profile
    from trident_rs.profiler import ProfileSpec, profile_model

    spec = ProfileSpec(model=args.model, shapes=parse_sizes(args.sizes), steps=args.steps, warmup=args.warmup,
                       repeats=args.repeats, widths=args.widths, batches=args.batches, executor_kind=args.executor)
    profile = profile_model(spec, progress=not args.no_progress)
    save_profile(profile, args.out)
    print(f"{profile.hardware.name}: {len(profile.points)} points -> {args.out}")
    print(f"{'stage':8} {'shape':>12} {'w':>2} {'b':>2} {'latency s':>10} {'memory GB':>10}")
    for p in profile.points:
        unit = "/step" if p.stage == "diffuse" else ""
        print(f"{p.stage:8} {p.shape.key:>12} {p.width_gpus:>2} {p.batch:>2} {p.latency_s:10.4f} {p.memory_gb:10.3f} {unit}")
    return 0
