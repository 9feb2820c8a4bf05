"""How well the cost model predicts diffuse latency at shapes it has not seen.

Leave-one-out on the shipped L20 table: for each measured (model, shape, width) point, build
the cost model from all the other points and predict the held-out one. Also leave-one-shape-out:
hold out a shape at every width at once, so no other width's measurement of it helps (this
tests the per-width token curves alone). Prints per-model median / max relative error (also for
the bare quadratic fit, for comparison) and writes benchmarks/results/cost_model_fit.json.

    .venv/bin/python benchmarks/cost_model_fit.py [--tiny] [--no-loo]

--tiny also profiles tiny-sd3 on this machine at two sizes, predicts a third size from that
profile and measures it (needs the diffusers executors).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from trident_rs.policy.cost_model import CostModel, token_count
from trident_rs.policy.profile_format import Profile, load_profile
from trident_rs.vocab import Shape

RESULTS = Path(__file__).resolve().parent / "results"


def leave_one_out() -> dict:
    """Per model: relative errors holding out one (shape, width) point ("model", "interior",
    "quadratic") and holding out a shape at every width at once ("shape_out")."""
    base = load_profile(CostModel.default_path())
    diffuse = [p for p in base.points if p.stage == "diffuse" and p.batch == 1]
    errors: dict[str, dict[str, list[float]]] = {}

    def rel(pred: float, meas: float) -> float:
        return abs(pred - meas) / meas

    for held in diffuse:
        rest = [p for p in base.points if p.key != held.key]
        cm = CostModel([Profile(hardware=base.hardware, points=rest)])
        pred = cm.predict(held.model, "diffuse", held.shape, held.width_gpus).latency_s
        series = cm._series[(held.model, "diffuse", held.width_gpus, 1)]  # bare quadratic, for comparison
        tokens = token_count(held.model, held.shape)
        per = errors.setdefault(held.model, {"model": [], "interior": [], "shape_out": [], "quadratic": []})
        per["model"].append(rel(pred, held.latency_s))
        measured = [token_count(held.model, s) for s in series.exact]
        if min(measured) < tokens < max(measured):
            per["interior"].append(rel(pred, held.latency_s))  # inside the width's remaining range
        per["quadratic"].append(rel(series.latency.base(tokens), held.latency_s))
    for model, shape in sorted({(p.model, p.shape) for p in diffuse}):
        rest = [p for p in base.points if not (p.model == model and p.stage == "diffuse" and p.shape == shape)]
        cm = CostModel([Profile(hardware=base.hardware, points=rest)])
        for held in (p for p in diffuse if p.model == model and p.shape == shape):
            pred = cm.predict(model, "diffuse", shape, held.width_gpus).latency_s
            errors[model]["shape_out"].append(rel(pred, held.latency_s))
    out = {}
    for model, e in sorted(errors.items()):
        out[model] = {k: {"median": statistics.median(v), "max": max(v), "n": len(v)} for k, v in e.items()}
    return out


def tiny_check(sizes=(128, 256, 512), held_out=384, steps=2, repeats=5) -> dict:
    """Profile `sizes` and `held_out` in one round-robin run; predict `held_out` from `sizes` only."""
    from trident_rs.profiler import ProfileSpec, profile_model

    shapes = [Shape(s, s) for s in sizes]
    target = Shape(held_out, held_out)
    t0 = time.perf_counter()
    profile = profile_model(ProfileSpec("tiny-sd3", shapes + [target], steps=steps, warmup=1, repeats=repeats))
    profile_s = time.perf_counter() - t0
    fitted = [p for p in profile.points if p.shape != target]
    cm = CostModel([Profile(hardware=profile.hardware, points=fitted)])
    rows = []
    for p in profile.points:
        if p.shape != target:
            continue
        pred = cm.predict("tiny-sd3", p.stage, target, p.width_gpus)
        rows.append({"stage": p.stage, "shape": target.key, "predicted_s": pred.latency_s, "measured_s": p.latency_s,
                     "rel_error": abs(pred.latency_s - p.latency_s) / p.latency_s,
                     "predicted_mem_gb": pred.memory_gb, "measured_mem_gb": p.memory_gb})
    return {"profiled_sizes": list(sizes), "held_out": held_out, "steps": steps, "repeats": repeats,
            "profile_seconds": profile_s, "profile": [p.model_dump() for p in fitted], "predictions": rows,
            "hardware": profile.hardware.name}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="also profile tiny-sd3 on this machine")
    parser.add_argument("--no-loo", action="store_true")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    result: dict = {}
    if not args.no_loo:
        result["leave_one_out"] = loo = leave_one_out()
        print(f"{'model':14} {'n':>3} {'median %':>9} {'max %':>7} | {'interp n':>8} {'median %':>9} {'max %':>7}"
              f" | {'shape out: median %':>19} {'max %':>7} | {'quadratic: median %':>19} {'max %':>7}")
        for model, r in loo.items():
            m, i, so, q = r["model"], r["interior"], r["shape_out"], r["quadratic"]
            print(f"{model:14} {m['n']:>3} {100*m['median']:9.1f} {100*m['max']:7.1f} | {i['n']:>8} "
                  f"{100*i['median']:9.1f} {100*i['max']:7.1f} | {100*so['median']:19.1f} {100*so['max']:7.1f}"
                  f" | {100*q['median']:19.1f} {100*q['max']:7.1f}")
    if args.tiny:
        result["tiny_sd3"] = tiny = tiny_check()
        print(f"\ntiny-sd3 on {tiny['hardware']}: profiled {tiny['profiled_sizes']} px "
              f"({tiny['steps']} steps, median of {tiny['repeats']}), held out {tiny['held_out']} px")
        for p in tiny["profile"]:
            print(f"  profiled {p['stage']:8} {p['height']:>4} px {p['latency_s']:.4f} s  {p['memory_gb']:.4f} GB")
        print(f"{'stage':8} {'predicted s':>11} {'measured s':>10} {'error %':>8}")
        for r in tiny["predictions"]:
            print(f"{r['stage']:8} {r['predicted_s']:11.4f} {r['measured_s']:10.4f} {100*r['rel_error']:8.1f}")
    name = "cost_model_fit.json" if not args.no_loo else "cost_model_tiny.json"
    (RESULTS / name).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
