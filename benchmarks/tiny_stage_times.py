"""Per-stage CPU wall times of each tiny model at two sizes, through the stage executors.

    .venv/bin/python benchmarks/tiny_stage_times.py [--steps 4] [--repeats 3] [--models tiny-flux ...]

Prints a markdown table and writes benchmarks/results/tiny_stage_times.json (with --models, only
those models' rows are replaced; the others stay). Each figure is the median of `repeats` runs
after one warm-up run (first calls pay one-off costs).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from trident_rs.pipeline_runner import LocalPipeline
from trident_rs.request import GenerationParams
from trident_rs.vocab import STAGES

CASES = [  # (model, height, width, frames)
    ("tiny-sd3", 64, 64, 1), ("tiny-sd3", 128, 128, 1),
    ("tiny-flux", 64, 64, 1), ("tiny-flux", 128, 128, 1),
    ("tiny-cogvideox", 64, 64, 9), ("tiny-cogvideox", 128, 128, 9),
    ("tiny-hunyuanvideo", 64, 64, 9), ("tiny-hunyuanvideo", 128, 128, 9),
]


def measure(runner: LocalPipeline, params: GenerationParams, repeats: int) -> dict[str, float]:
    runner.run([params])  # warm-up
    samples: dict[str, list[float]] = {s: [] for s in STAGES}
    for _ in range(repeats):
        (out,) = runner.run([params])
        for stage in STAGES:
            samples[stage].append(out.meta["timings_s"][stage])
    return {stage: 1000 * statistics.median(v) for stage, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="*", default=None, help="only these models (default: all)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "tiny_stage_times.json"))
    args = parser.parse_args()
    models = args.models or sorted({c[0] for c in CASES})

    rows, runners = [], {}
    for model, height, width, frames in CASES:
        if model not in models:
            continue
        if model not in runners:
            start = time.perf_counter()
            runners[model] = LocalPipeline(model)
            print(f"loaded {model} executors in {time.perf_counter() - start:.1f} s", flush=True)
        params = GenerationParams(model=model, prompt="a red cube on a blue sphere", height=height, width=width,
                                  num_frames=frames, steps=args.steps, seed=0).resolved()
        ms = measure(runners[model], params, args.repeats)
        rows.append({"model": model, "height": height, "width": width, "frames": frames, "steps": args.steps,
                     "guidance": params.guidance_scale, **{f"{s}_ms": round(ms[s], 1) for s in STAGES}})

    print(f"\n| model | size | frames | encode ms | diffuse ms ({args.steps} steps) | decode ms |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['width']}x{r['height']} | {r['frames']} | {r['encode_ms']:.0f} | "
              f"{r['diffuse_ms']:.0f} | {r['decode_ms']:.0f} |")
    out = Path(args.out)
    if args.models and out.is_file():  # keep the rows of models not measured this time
        kept = [r for r in json.loads(out.read_text())["rows"] if r["model"] not in models]
        rows = sorted(kept + rows, key=lambda r: [c[:3] for c in CASES].index((r["model"], r["height"], r["width"])))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__},
        "repeats": args.repeats, "rows": rows}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
