"""How much of a suite point's verdict is the stage-time noise: trident and the other policies
rerun at one point under several noise seeds (same arrivals, same shapes; only the lognormal
stage-time factors drawn again), and trident's attainment minus the best other's per seed.

    .venv/bin/python benchmarks/noise_seeds.py --points 5,10,16 --seeds 5
    .venv/bin/python benchmarks/noise_seeds.py --points tune --policies trident --seeds 3   # the noise floor

A point whose verdict flips across seeds is within the noise; a variant's gain or loss there
says little. With one policy, the table is its attainment per seed and the spread of its mean
over the points between seeds: a variant's mean gain smaller than that is within the noise.
Writes benchmarks/results/noise_seeds.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from suite import NOISE, OTHERS, judge, run_point, suite_points  # noqa: E402

SEED_STRIDE = 7919  # noise seed k of a point: its seed + k * SEED_STRIDE (k = 0 is the suite's own)
POLICIES = ("trident",) + OTHERS  # every policy the suite's verdicts judge trident against


def run_seed(args: tuple) -> dict:
    """The policies at one point under noise seed k (the suite's `run_point`): attainment and
    P95 per policy."""
    point, k, policies = args
    got = run_point((point, policies, False, point.seed + k * SEED_STRIDE))
    broken = {name: m["error"] for name, m in got["policies"].items() if "error" in m}
    if broken:  # a policy broke the engine's contract: a finding, not a figure
        raise RuntimeError(f"{point.name}, noise seed {k}: {broken}")
    return {"point": point.index, "name": point.name, "seed": k,
            "policies": {name: {"slo_attainment": m["slo_attainment"], "p95_latency_s": m["p95_latency_s"]}
                         for name, m in got["policies"].items()}}


def table(rows: list[dict]) -> str:
    """Per point: trident − best other per seed, their mean and spread, seeds within 0.02, and
    seeds where trident's P95 is at most the best other's (the suite's `judge`: the best other
    by attainment, then P95)."""
    by_point: dict[int, list[dict]] = {}
    for r in rows:
        by_point.setdefault(r["point"], []).append(r)
    lines = [f"{'point':<48} {'trident - best other, per seed':<40} {'mean':>7} {'sd':>6} {'>= -0.02':>8} {'P95 <=':>7}"]
    for idx in sorted(by_point):
        seeds = sorted(by_point[idx], key=lambda r: r["seed"])
        gaps, within, tail = [], 0, 0
        for r in seeds:
            # the point's load only matters to `judge` beside trident:elastic=0, which is not run here
            verdict = judge({"point": {"load": 0.0}, "policies": r["policies"]})
            gaps.append(verdict["trident_attainment"] - verdict["best_other_attainment"])
            within += verdict["no_regression"]
            tail += verdict["p95_not_worse"]
        lines.append(f"{seeds[0]['name'][:48]:<48} {' '.join(f'{g:+.3f}' for g in gaps):<40} "
                     f"{statistics.mean(gaps):+7.3f} {statistics.pstdev(gaps):6.3f} {within:>4}/{len(gaps)} {tail:>4}/{len(gaps)}")
    return "\n".join(lines)


def spread(rows: list[dict], policy: str) -> str:
    """One policy: its mean attainment over the points at each seed, and how far apart they are."""
    seeds = sorted({r["seed"] for r in rows})
    means = [statistics.mean(r["policies"][policy]["slo_attainment"] for r in rows if r["seed"] == k) for k in seeds]
    per_point: dict[int, list[float]] = {}
    for r in rows:
        per_point.setdefault(r["point"], []).append(r["policies"][policy]["slo_attainment"])
    sd = statistics.mean(statistics.pstdev(v) for v in per_point.values())
    return (f"{policy}: mean attainment over {len(per_point)} points per seed "
            f"{' '.join(f'{m:.4f}' for m in means)} (range {max(means) - min(means):.4f}); "
            f"per-point sd across seeds, averaged: {sd:.4f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", required=True, help="comma-separated suite point indices (full suite), or tune")
    ap.add_argument("--policies", nargs="+", default=list(POLICIES))
    ap.add_argument("--seeds", type=int, default=5, help="noise seeds per point (the first is the suite's own)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/noise_seeds.json")
    args = ap.parse_args()
    if args.seeds < 1:
        ap.error("--seeds must be >= 1")
    if args.points == "tune":
        points = [p for p in suite_points(False) if not p.check]
    else:
        want = {int(x) for x in args.points.split(",") if x.strip()}
        points = [p for p in suite_points(False) if p.index in want]
        if len(points) != len(want):
            ap.error(f"no such suite points: {sorted(want - {p.index for p in points})}")
    work = [(p, k, tuple(args.policies)) for p in points for k in range(args.seeds)]
    t0 = time.perf_counter()
    with mp.get_context("fork").Pool(max(1, args.jobs)) as pool:
        rows = list(pool.imap_unordered(run_seed, work))
    wall = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"noise": NOISE, "seed_stride": SEED_STRIDE, "wall_s": wall,
                                          "rows": sorted(rows, key=lambda r: (r["point"], r["seed"]))}, indent=1))
    if "trident" in args.policies and len(args.policies) > 1:
        print(table(rows))
    for name in args.policies:
        print(spread(rows, name))
    print(f"\n{len(points)} points x {args.seeds} noise seeds in {wall:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
