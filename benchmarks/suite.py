"""The yardstick: every policy on a broad, seeded suite of generated workloads, in the simulator
with the fair engine (memory enforced, stage-time noise, Serve's overheads, regroup costs).

    .venv/bin/python benchmarks/suite.py --quick            # 32 points, < 6 min on 2 cores
    .venv/bin/python benchmarks/suite.py                    # 160 points, < 40 min on 2 cores
    .venv/bin/python benchmarks/suite.py --only check       # the held-out checking points only
    .venv/bin/python benchmarks/suite.py --quick --draw 1   # a fresh draw: unseen workloads
    .venv/bin/python benchmarks/suite.py --report benchmarks/results/suite_quick.json  # tables of a run
    .venv/bin/python benchmarks/suite.py --policies trident --merge benchmarks/results/suite.json \
        --note "why"                                        # rerun one policy into an earlier run

Each point declares (see `SuitePoint`):
- family: sd3, flux, cogvideox, hunyuanvideo alone, or an image family mixed with a video
  family (flux+hunyuanvideo, sd3+cogvideox; 80% images by count); shapes uniform over the
  family's mix (`FAMILY_SHAPES`);
- steps: the model's default, or for video the few steps of the paper's CogVideoX evaluation (6);
- arrivals: poisson; gamma (bursty, gaps with coefficient of variation 3); azure (the real
  Azure LLM conversation trace's arrival pattern, rescaled to the rate, from a seeded offset);
  shift (Poisson, the first half from the smaller half of the shapes, the second from the larger);
- load: the arrival rate over the cluster's capacity for the mix, where capacity is the rate at
  which the cluster's GPU-seconds just cover every request at its cheapest width (encode +
  diffuse + decode GPU-seconds; no policy, baseline or ours, sustains more): 0.4 to 3;
- SLO scale: 2, 4 or 8 (the paper's rule, `policy/slo.py`);
- cluster: 32 (4 x 8) or 128 (16 x 8) L20 GPUs of 48 GB;
- seed: the arrivals, the shape draw and the stage-time noise (lognormal, sigma `NOISE` = 0.2,
  mean 1; policies see only predictions).
The arrival window is cut to about `target` requests (150 quick, 300 on 32 GPUs, 500 on 128),
between 120 and 1,200 s; every request arrived is run to completion.

No policy sees the future: static policies and trident (its prior of the models' shares of the
pool) get each model's share of GPU time from the same generator at another seed (yesterday's
traffic). `trident` is the shared-pool placement; `trident:placement=groups` runs the solver's
replica groups (what Serve runs) side by side.

Checking points: every point whose index is 4 mod 5 is `check`: chosen before any policy
change, reported apart, never tuned on (`--only tune` leaves them out).

Output: `benchmarks/results/suite[_quick].json` (every policy's metrics at every point, and
trident's per-request timelines of missed requests with `--timelines`), a summary table on
stdout, `benchmarks/results/suite[_quick].png`.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from trident_rs.models.spec import REGISTRY
from trident_rs.policy.cost_model import CostModel
from trident_rs.policy.slo import slo_seconds
from trident_rs.policy.traces import azure_arrivals
from trident_rs.policy.types import Cluster, Request, Shape
from trident_rs.sim import PolicyViolation, SimConfig
from trident_rs.sim.runner import best_of, run_policy
from trident_rs.sim.workloads import synthetic_arrivals

NOISE = 0.2
FAMILIES = ("sd3", "flux", "cogvideox", "hunyuanvideo", "flux+hunyuanvideo", "sd3+cogvideox")
FAMILY_SHAPES: dict[str, tuple[Shape, ...]] = {
    "sd3": tuple(Shape(s, s) for s in (256, 512, 1024, 1536)),
    "flux": tuple(Shape(s, s) for s in (128, 256, 512, 1024, 2048)),
    "cogvideox": tuple(Shape(768, w, f) for w in (432, 1360) for f in (17, 33, 65, 81)),
    "hunyuanvideo": tuple(Shape(h, w, f) for h, w in ((720, 1280), (960, 544)) for f in (17, 33, 65, 129)),
}
FEW_VIDEO_STEPS = 6
ARRIVALS = ("poisson", "gamma", "azure", "shift")
LOADS = (0.4, 0.7, 1.0, 1.5, 2.0, 3.0)
SLO_SCALES = (2.0, 4.0, 8.0)
CLUSTERS = (32, 128)
TRIDENT_NO_STEPS = "trident:elastic=0"  # trident without step elasticity (whole-stage diffuse launches)
POLICIES = ("static-best", "static-best-fcfs", "dynamic-pipeline", "paper", "tetriserve", "genserve",
            TRIDENT_NO_STEPS, "trident", "bound")
OVERLOADED = 1.5  # loads from here up are the "overloaded points" of the step-elasticity criteria
IMAGE_SHARE = 0.8  # of requests in image+video mixes


@dataclass(frozen=True)
class SuitePoint:
    index: int
    family: str
    steps: str  # "default" | "few"
    arrivals: str
    load: float
    slo_scale: float
    gpus: int
    seed: int
    target: int  # requests to aim for
    draw: int = 0  # 0: the suite's own points; K > 0: a fresh draw (`--draw K`), never tuned on

    @property
    def check(self) -> bool:
        return self.draw > 0 or self.index % 5 == 4

    @property
    def name(self) -> str:
        return (f"{self.index:03d}-{self.family}-{self.steps}-{self.arrivals}-x{self.load:g}-slo{self.slo_scale:g}"
                f"-{self.gpus}g-s{self.seed}" + (f"-d{self.draw}" if self.draw else ""))


def suite_points(quick: bool, draw: int = 0) -> list[SuitePoint]:
    """The declared points: a seeded draw where every axis value appears evenly (each axis walks
    its values in a shuffled cycle). `draw` K > 0: another draw of the same axes, with other
    combinations, arrivals, shapes and noise (seeds 100 K + index mod 5): workloads no policy
    change was ever judged on, every point a checking point."""
    if draw < 0:
        raise ValueError(f"draw must be >= 0, got {draw}")
    n = 32 if quick else 160
    rng = random.Random(2026_12_01 + (1 if quick else 0) + 1000 * draw)

    def cycle(values):
        out = []
        while len(out) < n:
            vals = list(values)
            rng.shuffle(vals)
            out += vals
        return out[:n]

    fams, arrs, loads, slos = cycle(FAMILIES), cycle(ARRIVALS), cycle(LOADS), cycle(SLO_SCALES)
    gpus = [32] * n if quick else cycle(CLUSTERS)
    steps = cycle(("default", "few"))
    points = []
    for i in range(n):
        st = steps[i] if any(REGISTRY[m].is_video for m in fams[i].split("+")) else "default"
        target = 150 if quick else (300 if gpus[i] == 32 else 500)
        points.append(SuitePoint(i, fams[i], st, arrs[i], loads[i], slos[i], gpus[i], 100 * draw + i % 5, target, draw))
    return points


# ---- workloads ------------------------------------------------------------------------------
def mix(point: SuitePoint) -> list[tuple[str, Shape, int, float]]:
    """(model, shape, steps, weight) of the point's family."""
    models = point.family.split("+")
    out = []
    for m in models:
        spec = REGISTRY[m]
        steps = FEW_VIDEO_STEPS if spec.is_video and point.steps == "few" else spec.default_steps
        share = 1.0 if len(models) == 1 else (IMAGE_SHARE if not spec.is_video else 1 - IMAGE_SHARE)
        shapes = FAMILY_SHAPES[m]
        out += [(m, s, steps, share / len(shapes)) for s in shapes]
    return out


def cheapest_gpu_seconds(cost: CostModel, model: str, shape: Shape, steps: int, gpus_per_node: int) -> float:
    """Encode + diffuse + decode GPU-seconds of one request at its cheapest widths that fit."""
    total = 0.0
    for stage in ("encode", "diffuse", "decode"):
        need = cost.min_width(model, stage, shape, 48.0)
        ws = [w for w in cost.widths(model, stage) if need <= w <= gpus_per_node]
        total += min(w * cost.stage_time(model, stage, shape, w, 1, steps if stage == "diffuse" else 1) for w in ws)
    return total


def capacity_rps(point: SuitePoint, cost: CostModel) -> float:
    entries = mix(point)
    mean = sum(wt * cheapest_gpu_seconds(cost, m, s, st, 8) for m, s, st, wt in entries) / sum(e[3] for e in entries)
    return point.gpus / mean


def arrival_times(kind: str, rate: float, duration: float, rng: np.random.Generator) -> np.ndarray:
    if kind in ("poisson", "shift"):
        return synthetic_arrivals("poisson", rate, duration, 1.0, rng)
    if kind == "gamma":
        return synthetic_arrivals("gamma", rate, duration, 3.0, rng)
    if kind == "azure":
        t, _ = azure_arrivals()
        t = t * (len(t) / max(t[-1], 1e-9)) / rate  # mean rate -> rate
        start = rng.uniform(0, max(t[-1] - duration, 0.0))
        sel = t[(t >= start) & (t < start + duration)] - start
        return sel
    raise ValueError(kind)


def requests_for(point: SuitePoint, cost: CostModel, seed: int | None = None) -> list[Request]:
    """The point's requests (`seed` overrides the point's: another day of the same traffic)."""
    seed = point.seed if seed is None else seed
    rng = np.random.default_rng([seed, point.index])
    rate = point.load * capacity_rps(point, cost)
    duration = min(max(point.target / rate, 120.0), 1200.0)
    times = arrival_times(point.arrivals, rate, duration, rng)
    entries = mix(point)
    weights = np.asarray([e[3] for e in entries])
    picks = rng.choice(len(entries), size=len(times), p=weights / weights.sum())
    if point.arrivals == "shift":  # first half from the smaller shapes, second half from the larger
        order = sorted(range(len(entries)), key=lambda i: (entries[i][1].pixels, i))
        small, large = order[: len(order) // 2], order[len(order) // 2:]
        half = len(times) // 2
        for part, idx in ((slice(0, half), small), (slice(half, None), large)):
            w = weights[idx] / weights[idx].sum()
            picks[part] = rng.choice(idx, size=len(picks[part]), p=w)
    slo_cache: dict[tuple, float] = {}
    out = []
    for i, (t, k) in enumerate(zip(times, picks)):
        m, s, st, _ = entries[k]
        key = (m, s, st)
        if key not in slo_cache:
            slo_cache[key] = slo_seconds(cost, m, s, st, point.slo_scale)
        out.append(Request(f"p{point.index}-{i}", m, s, st, float(t), float(t) + slo_cache[key]))
    return out


# ---- running --------------------------------------------------------------------------------
def parse_variant(name: str) -> tuple[str, dict]:
    """`trident:on_time_width=narrowest,latency_aware=0` -> ("trident", options) (ablations)."""
    base, _, rest = name.partition(":")
    options: dict = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key == "prior_weight":  # a controller option
            options.setdefault("controller", {})[key] = float(value)
        else:
            options[key] = {"0": False, "1": True}.get(value, value)
    return base, options


_COST: CostModel | None = None


def run_point(args: tuple) -> dict:
    """Every policy in `policies` at one point: (point, policies, timelines[, noise seed]); the
    noise seed defaults to the point's own (`benchmarks/noise_seeds.py` draws others)."""
    point, policies, timelines, noise_seed = (*args, None)[:4]
    global _COST
    if _COST is None:
        _COST = CostModel.default()
    cost = _COST
    reqs = requests_for(point, cost)
    history = requests_for(point, cost, seed=point.seed + 1000)
    cluster = Cluster(point.gpus // 8, 8)
    config = SimConfig(noise=NOISE, seed=point.seed if noise_seed is None else noise_seed)
    out = {"point": asdict(point), "name": point.name, "check": point.check, "requests": len(reqs),
           "capacity_rps": capacity_rps(point, cost), "policies": {}}
    t_all = time.perf_counter()
    for name in policies:
        if name == "static-best-fcfs":
            continue  # derived from static-best's sweep below
        t0 = time.perf_counter()
        base, options = parse_variant(name)
        try:
            run = run_policy(base, reqs, cluster, cost, config, history=history,
                             keep_result=timelines and name == "trident", **options)
        except PolicyViolation as e:  # a policy broke the contract: a finding, reported with the point
            out["policies"][name] = {"error": str(e)}
            continue
        if run is None:
            raise RuntimeError(f"policy {name!r} is not available (see the warning above)")
        row = {**run.metrics, "wall_s": time.perf_counter() - t0}
        if name == "static-best":
            mbv = run.detail["metrics_by_variant"]
            row["variant"] = run.detail["variant"]
            if "static-best-fcfs" in policies:
                fname, fm = best_of(mbv, [n for n in mbv if n.startswith("static-pipeline") and not n.endswith("-edf")])
                out["policies"]["static-best-fcfs"] = {**fm, "variant": fname}
            row["attainment_by_variant"] = run.detail["attainment_by_variant"]
        elif name == "bound":
            row.update({k: v for k, v in run.detail.items()})
        if run.result is not None:
            res = run.result
            missed = [r.id for r in reqs if res.finish.get(r.id, math.inf) > r.deadline + 1e-9]
            out["trident_missed_timelines"] = {rid: res.request_timeline(rid) for rid in missed[:200]}
        out["policies"][name] = row
    out["wall_s"] = time.perf_counter() - t_all
    return out


# ---- summary --------------------------------------------------------------------------------
OTHERS = ("static-best", "static-best-fcfs", "dynamic-pipeline", "paper", "tetriserve", "genserve")
STEP_LEVEL = ("tetriserve", "genserve")


def judge(point: dict) -> dict:
    """trident against the best other policy at one point (the issue's criteria)."""
    p = {n: m for n, m in point["policies"].items() if "error" not in m}
    t = p.get("trident")
    others = {n: p[n] for n in OTHERS if n in p}
    if t is None or not others:
        return {}
    best_name = max(others, key=lambda n: (others[n]["slo_attainment"], -others[n]["p95_latency_s"]))
    best = others[best_name]
    out = {"best_other": best_name, "best_other_attainment": best["slo_attainment"],
           "trident_attainment": t["slo_attainment"],
           "no_regression": t["slo_attainment"] >= best["slo_attainment"] - 0.02,
           "p95_not_worse": t["p95_latency_s"] <= best["p95_latency_s"] * (1 + 1e-9)}
    if best["slo_attainment"] <= 0.8:
        out["gain_over_best"] = t["slo_attainment"] / max(best["slo_attainment"], 1e-9)
    fcfs = p.get("static-best-fcfs")
    if fcfs is not None and fcfs["slo_attainment"] <= 0.5:
        out["gain_over_fcfs"] = t["slo_attainment"] / max(fcfs["slo_attainment"], 1e-9)
    if "bound" in p:
        out["bound_minus_trident"] = p["bound"]["slo_attainment"] - t["slo_attainment"]
    static = p.get("static-best")
    if static is not None and static["slo_attainment"] <= 0.5:  # step elasticity: >= 1.1x the step-level baselines
        out["gain_over_step_level"] = min(t["slo_attainment"] / max(p[n]["slo_attainment"], 1e-9)
                                          for n in STEP_LEVEL if n in p) if any(n in p for n in STEP_LEVEL) else None
    fixed = p.get(TRIDENT_NO_STEPS)
    if fixed is not None and point["point"]["load"] >= OVERLOADED:  # step elasticity's tail criterion
        out["p95_gain_over_no_steps"] = fixed["p95_latency_s"] / max(t["p95_latency_s"], 1e-9)
        out["attainment_vs_no_steps"] = t["slo_attainment"] - fixed["slo_attainment"]
    return out


def summary(points: list[dict]) -> str:
    errors = [(pt["name"], n, m["error"]) for pt in points for n, m in pt["policies"].items() if "error" in m]
    points = [{**pt, "policies": {n: m for n, m in pt["policies"].items() if "error" not in m}} for pt in points]
    names = [n for n in POLICIES if any(n in pt["policies"] for pt in points)]
    lines = []
    for label, subset in (("all", points), ("tune", [p for p in points if not p["check"]]),
                          ("check", [p for p in points if p["check"]])):
        if not subset:
            continue
        lines.append(f"\n{label}: {len(subset)} points")
        lines.append(f"{'policy':<18}{'mean att':>9}{'min att':>9}{'med P95 s':>11}{'failed':>8}{'best±.02':>9}")
        for n in names:
            rows = [pt["policies"][n] for pt in subset if n in pt["policies"]]
            att = [r["slo_attainment"] for r in rows]
            p95 = [r["p95_latency_s"] for r in rows if not math.isnan(r["p95_latency_s"])]
            top = sum(1 for pt in subset if n in pt["policies"] and pt["policies"][n]["slo_attainment"] >=
                      max(pt["policies"][m]["slo_attainment"] for m in names if m in pt["policies"] and m != "bound") - 0.02)
            lines.append(f"{n:<18}{np.mean(att):>9.3f}{np.min(att):>9.3f}{np.median(p95) if p95 else math.nan:>11.1f}"
                         f"{sum(r.get('failed', 0) for r in rows):>8}{top if n != 'bound' else '-':>9}")
        js = [judge(pt) for pt in subset]
        js = [j for j in js if j]
        if js:
            gains = [j["gain_over_best"] for j in js if "gain_over_best" in j]
            fgains = [j["gain_over_fcfs"] for j in js if "gain_over_fcfs" in j]
            bgap = [j["bound_minus_trident"] for j in js if "bound_minus_trident" in j]
            lines.append(f"trident: no regression (>= best other - 0.02) at {sum(j['no_regression'] for j in js)}/{len(js)}; "
                         f"P95 <= best other's at {sum(j['p95_not_worse'] for j in js)}/{len(js)}; "
                         f"where best other <= 0.8: gain >= 1.1x at {sum(g >= 1.1 for g in gains)}/{len(gains)} "
                         f"(median {np.median(gains) if gains else math.nan:.2f}x); "
                         f"where FCFS static-best <= 0.5: gain >= 2.5x at {sum(g >= 2.5 for g in fgains)}/{len(fgains)} "
                         f"(median {np.median(fgains) if fgains else math.nan:.2f}x); "
                         f"bound - trident median {np.median(bgap) if bgap else math.nan:.3f}")
            steps = [j for j in js if "p95_gain_over_no_steps" in j]
            sgain = [j["gain_over_step_level"] for j in js if j.get("gain_over_step_level") is not None]
            if steps or sgain:
                lines.append(f"step elasticity: on overloaded points (load >= {OVERLOADED}) P95 >= 2x lower than without "
                             f"at equal or better attainment at {sum(j['p95_gain_over_no_steps'] >= 2 and j['attainment_vs_no_steps'] >= 0 for j in steps)}/{len(steps)} "
                             f"(median P95 gain {np.median([j['p95_gain_over_no_steps'] for j in steps]) if steps else math.nan:.2f}x, "
                             f"attainment >= without at {sum(j['attainment_vs_no_steps'] >= 0 for j in steps)}/{len(steps)}); "
                             f"where static-best <= 0.5: >= 1.1x tetriserve and genserve at {sum(g >= 1.1 for g in sgain)}/{len(sgain)}")
    for name, policy, err in errors:
        lines.append(f"ERROR at {name}: {policy}: {err[:160]}")
    return "\n".join(lines)


def breakdown(points: list[dict]) -> str:
    """Mean attainment per policy by each axis of the suite, trident's P95 against the best
    other policy's, and the tune points where trident regresses (check points: counts only)."""
    points = [{**pt, "policies": {n: m for n, m in pt["policies"].items() if "error" not in m}} for pt in points]
    names = [n for n in POLICIES if any(n in pt["policies"] for pt in points)]
    lines = []
    for axis in ("family", "steps", "arrivals", "load", "slo_scale", "gpus"):
        values = sorted({pt["point"][axis] for pt in points}, key=str)
        lines.append(f"\n{'by ' + axis:<20}" + "".join(f"{str(v):>19}" for v in values))
        for n in names:
            cells = []
            for v in values:
                att = [pt["policies"][n]["slo_attainment"] for pt in points
                       if pt["point"][axis] == v and n in pt["policies"]]
                cells.append(f"{np.mean(att):>15.3f} ({len(att):>2})" if att else f"{'-':>19}")
            lines.append(f"{n:<20}" + "".join(cells))
    js = [(pt, judge(pt)) for pt in points]
    tails = [(pt["policies"]["trident"]["p95_latency_s"], pt["policies"][j["best_other"]]["p95_latency_s"])
             for pt, j in js if j]
    ratios = [t / b for t, b in tails if 0 < b < math.inf and t < math.inf]
    if ratios:  # an infinite P95: more than 5% of the requests never finished (failed for memory)
        lines.append(f"\ntrident P95 / best other's P95, where both are finite: median {np.median(ratios):.2f}x, "
                     f"geometric mean {math.exp(np.mean(np.log(ratios))):.2f}x, <= 1 at {sum(r <= 1 for r in ratios)}/{len(ratios)}; "
                     f"best other's P95 infinite (> 5% never served) at {sum(b == math.inf for _, b in tails)}, "
                     f"trident's at {sum(t == math.inf for t, _ in tails)}")
    lost = [(pt, j) for pt, j in js if j and not j["no_regression"]]
    lines.append(f"trident below the best other - 0.02 at {len(lost)} points "
                 f"({sum(pt['check'] for pt, _ in lost)} of them check points, not listed):")
    for pt, j in lost:
        if not pt["check"]:
            lines.append(f"  {pt['name']:<58} {j['best_other']:<17} {j['best_other_attainment']:.3f}  "
                         f"trident {j['trident_attainment']:.3f}")
    return "\n".join(lines)


def bound_table(points: list[dict]) -> str:
    """The tightened bound next to the old one (alone and fluid only) at each point."""
    lines = [f"{'point':<58}{'old':>7}{'energetic':>10}{'t-indexed':>10}{'new':>7}{'trident':>8}"]
    for pt in points:
        b = pt["policies"].get("bound")
        if b is None:
            continue
        old = min(b["alone_attainment"], b["fluid_attainment"])
        fmt = lambda v: f"{v:.3f}" if v is not None else "-"  # noqa: E731
        lines.append(f"{pt['name']:<58}{old:>7.3f}{fmt(b.get('energetic_attainment')):>10}"
                     f"{fmt(b.get('time_indexed_attainment')):>10}{b['slo_attainment']:>7.3f}"
                     f"{pt['policies'].get('trident', {}).get('slo_attainment', math.nan):>8.3f}")
    olds = [min(pt["policies"]["bound"]["alone_attainment"], pt["policies"]["bound"]["fluid_attainment"])
            for pt in points if "bound" in pt["policies"]]
    news = [pt["policies"]["bound"]["slo_attainment"] for pt in points if "bound" in pt["policies"]]
    if olds:
        lines.append(f"mean: old {np.mean(olds):.3f}, new {np.mean(news):.3f}; tighter at "
                     f"{sum(n < o - 1e-9 for n, o in zip(news, olds))}/{len(olds)} points")
    return "\n".join(lines)


def plot(points: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    js = [(pt, judge(pt)) for pt in points]
    js = [(pt, j) for pt, j in js if j]
    for check, marker in ((False, "o"), (True, "s")):
        xs = [j["best_other_attainment"] for pt, j in js if pt["check"] == check]
        ys = [j["trident_attainment"] for pt, j in js if pt["check"] == check]
        axes[0].scatter(xs, ys, marker=marker, alpha=0.7, label="check points" if check else "tune points")
    axes[0].plot([0, 1], [0, 1], "k--", lw=0.8)
    axes[0].set_xlabel("best other policy's SLO attainment")
    axes[0].set_ylabel("trident's SLO attainment")
    axes[0].legend()
    axes[0].grid(alpha=0.3)
    names = [n for n in POLICIES if any(n in pt["policies"] for pt in points)]
    order = sorted(range(len(points)), key=lambda i: points[i]["policies"].get("bound", {}).get("slo_attainment", 1))
    for n in names:
        axes[1].plot(range(len(order)), [points[i]["policies"].get(n, {}).get("slo_attainment", math.nan) for i in order],
                     marker=".", lw=0.8, label=n, linestyle="--" if n == "bound" else "-")
    axes[1].set_xlabel("suite point (sorted by bound)")
    axes[1].set_ylabel("SLO attainment")
    axes[1].legend(fontsize=7)
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_doc(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc, indent=1, default=float))


def merge_into(path: Path, results: list[dict], note: str) -> dict:
    """Replace, at each of this run's points, the metrics of the policies it ran (and trident's
    timelines, where kept) in an earlier run's JSON: a policy changed since that run is rerun
    alone, the others keep their figures."""
    doc = json.loads(path.read_text())
    by_name = {pt["name"]: pt for pt in doc["points"]}
    missing = [r["name"] for r in results if r["name"] not in by_name]
    if missing:
        raise SystemExit(f"--merge: {path} has no point(s) {missing[:3]}")
    for r in results:
        pt = by_name[r["name"]]
        pt["policies"].update(r["policies"])
        if "trident_missed_timelines" in r:
            pt["trident_missed_timelines"] = r["trident_missed_timelines"]
    doc["note"] = note
    write_doc(path, doc)
    return doc


def save_run(doc: dict, path: Path, merge: Path | None, note: str) -> tuple[dict, Path]:
    """Write this run's JSON at `path`, or with `merge`, merge its policies into that earlier
    run (and write the run alone at `path` only where that is another file: the default `--out`
    is the earlier run's own path). Returns the document the tables and the plot show (the
    merged one) and where that is."""
    if merge is None:
        write_doc(path, doc)
        return doc, path
    if path.resolve() != merge.resolve():
        write_doc(path, doc)
    return merge_into(merge, doc["points"], note), merge


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="32 points on 32 GPUs, ~150 requests each")
    ap.add_argument("--only", choices=("all", "tune", "check"), default="all")
    ap.add_argument("--draw", type=int, default=0,
                    help="K > 0: a fresh draw of points, never tuned on (all of them checking points)")
    ap.add_argument("--points", type=str, default="", help="comma-separated point indices")
    ap.add_argument("--policies", nargs="+", default=list(POLICIES))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timelines", action="store_true", help="keep trident's timelines of missed requests")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default="", help="suffix of the output files")
    ap.add_argument("--report", default="", help="print the summary and bound table of an existing JSON; run nothing")
    ap.add_argument("--merge", default="", help="also merge this run's policies into an existing JSON (same points)")
    ap.add_argument("--note", default="", help="with --merge: what was rerun and why (the JSON's `note`)")
    args = ap.parse_args()
    if args.report:
        doc = json.loads(Path(args.report).read_text())
        print(summary(doc["points"]))
        print(breakdown(doc["points"]))
        print("\n" + bound_table(doc["points"]))
        return 0
    if args.merge and not Path(args.merge).is_file():
        ap.error(f"--merge: no such file {args.merge}")
    if args.draw < 0:
        ap.error(f"--draw must be >= 0, got {args.draw}")
    points = suite_points(args.quick, args.draw)
    if args.only != "all":
        points = [p for p in points if p.check == (args.only == "check")]
    if args.points:
        keep = {int(x) for x in args.points.split(",")}
        points = [p for p in points if p.index in keep]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = ("suite_quick" if args.quick else "suite") + (f"_draw{args.draw}" if args.draw else "") \
        + (f"_{args.tag}" if args.tag else "")
    t0 = time.perf_counter()
    results = []
    work = [(p, tuple(args.policies), args.timelines) for p in points]
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    with mp.get_context("fork").Pool(max(1, args.jobs)) as pool:
        it = pool.imap_unordered(run_point, work)
        if tqdm is not None:
            it = tqdm(it, total=len(work), desc="suite", file=sys.stderr, mininterval=2)
        for r in it:
            results.append(r)
    results.sort(key=lambda r: r["point"]["index"])
    wall = time.perf_counter() - t0
    doc = {"quick": args.quick, "noise": NOISE, "wall_s": wall, "points": results}
    note = args.note or f"{' '.join(args.policies)} rerun and merged"
    shown, path = save_run(doc, out / f"{stem}.json", Path(args.merge) if args.merge else None, note)
    plot(shown["points"], path.with_suffix(".png"))
    print(summary(shown["points"]))
    print(breakdown(shown["points"]))
    if any("bound" in pt["policies"] for pt in shown["points"]):
        print("\n" + bound_table(shown["points"]))
    print(f"\n{len(results)} points in {wall:.0f} s; wrote {path} and {path.with_suffix('.png').name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
