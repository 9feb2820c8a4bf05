"""Placement solver: how many replica groups of each (model, stage, width), and where.

Two steps, so that 1,024 GPUs solve in well under a second:

1. **Counts (CP-SAT).** Nodes are identical, so the model decides replica counts in aggregate.
   Variables: `n[d]`, replicas of deployment d = (model, stage, width); `x[c, w]`, the rate of
   class c served on time with diffuse at width w (only widths where encode + diffuse + decode
   fit the class's SLO, and that fit in memory). Capacity: a deployment's busy time per second,
   `sum_c x[c, w] * t(c, w)`, is at most `utilization * n[d]` (the cap leaves room for
   queueing); for encode and decode at most `utilization² * n[d]`, so that they keep up with
   diffuse running at full use (late work back to back), not only at `utilization`. Packing: widths divide each other (1, 2, 4, 8), so groups fit on nodes iff for
   every width w, the GPUs in groups at least w wide are at most `nodes * floor(G / w) * w`.
   Presence: every class has an encode, a diffuse and a decode group it fits on.
   Objective: on-time rate (predicted goodput, i.e. attainment × demand), tie-broken toward
   fewer GPUs changed from the current plan. A greedy fallback covers a timed-out solve.
2. **Packing (greedy).** GPUs left over go to the deployment with the highest predicted
   utilisation; then `trident_rs.policy.packing.pack` places groups widest first on aligned
   GPU blocks, keeping the current plan's groups that are still wanted where they are.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ortools.sat.python import cp_model

from trident_rs.errors import ConfigError
from trident_rs.policy.cpsat import limited_solver
from trident_rs.policy.packing import Deployment, deployment_of, group_id, pack, plan_counts
from trident_rs.policy.types import Cluster, PlacementPlan
from trident_rs.policy.workload import Forecast, RequestClass

if TYPE_CHECKING:
    from trident_rs.policy.cost_model import CostModel

RATE_UNIT = 1e-3  # x variables count milli-requests per second
TIME_UNIT = 1e-3  # stage times in milliseconds (rounded up)


@dataclass(frozen=True)
class ClassCosts:
    """What the solver knows about one request class."""

    cls: RequestClass
    encode: Deployment
    decode: Deployment
    t_encode: float
    t_decode: float
    t_diffuse: dict[int, float]  # usable width -> diffuse time (all steps)
    slack: float = 1.0  # plan on-time service within this share of the SLO (room for queueing)

    def on_time_widths(self) -> list[int]:
        """Widths whose service time fits `slack` × SLO (or, if none does, the whole SLO)."""
        fixed = self.t_encode + self.t_decode
        ok = [w for w, t in sorted(self.t_diffuse.items()) if fixed + t <= self.slack * self.cls.slo_s]
        return ok or [w for w, t in sorted(self.t_diffuse.items()) if fixed + t <= self.cls.slo_s]

    def efficient_width(self, threshold: float = 0.8) -> int:
        """Where late work goes: the widest usable width whose parallel efficiency (relative to
        the narrowest usable width) is >= `threshold` — nearly as cheap in GPU-seconds as the
        narrowest, and much faster, so late requests do not hold GPUs for hours."""
        w0 = min(self.t_diffuse)
        ok = [w for w, t in self.t_diffuse.items() if (self.t_diffuse[w0] * w0) / (t * w) >= threshold]
        return max(ok) if ok else w0


class PlacementSolver:
    """Chooses a stage-level `PlacementPlan` for a forecast. Deterministic for equal inputs."""

    def __init__(self, cluster: Cluster, cost: "CostModel", *, time_limit_s: float = 0.5,
                 utilization: float = 0.85, num_workers: int = 1, seed: int = 0, slo_slack: float = 0.4,
                 fair_share: bool = True):
        if cluster.nodes < 1 or cluster.gpus_per_node < 1:
            raise ConfigError(f"cluster needs at least one node and one GPU per node, got {cluster}")
        if not 0 < utilization <= 1:
            raise ConfigError(f"utilization must be in (0, 1], got {utilization}")
        if time_limit_s <= 0:
            raise ConfigError(f"time_limit_s must be > 0, got {time_limit_s}")
        self.cluster, self.cost = cluster, cost
        if not 0 < slo_slack <= 1:
            raise ConfigError(f"slo_slack must be in (0, 1], got {slo_slack}")
        self.time_limit_s, self.utilization, self.slo_slack = time_limit_s, utilization, slo_slack
        self.fair_share = fair_share
        self.num_workers, self.seed = num_workers, seed

    # ---- request classes -> costs -------------------------------------------------------
    def class_costs(self, forecast: Forecast) -> list[ClassCosts]:
        """Stage times and usable widths per class; ConfigError if a class cannot run at all."""
        G, mem = self.cluster.gpus_per_node, self.cluster.gpu_memory_gb
        out = []
        for c in sorted(forecast.rates):
            m, shape, steps = c.model, c.shape, c.steps
            fixed: dict[str, tuple[Deployment, float]] = {}
            for stage in ("encode", "decode"):
                need = self.cost.min_width(m, stage, shape, mem)
                widths = [w for w in self.cost.widths(m, stage) if need <= w <= G]
                if not widths:
                    raise ConfigError(f"{m} {shape.key}: {stage} needs {need} GPUs, nodes have {G}")
                w = min(widths)
                fixed[stage] = (Deployment(m, stage, w), self.cost.stage_time(m, stage, shape, w, 1, steps))
            need = self.cost.min_width(m, "diffuse", shape, mem)
            t_diffuse = {w: self.cost.stage_time(m, "diffuse", shape, w, 1, steps)
                         for w in self.cost.widths(m, "diffuse") if need <= w <= G}
            if not t_diffuse:
                raise ConfigError(f"{m} {shape.key}: diffuse needs {need} GPUs, nodes have {G}")
            out.append(ClassCosts(c, fixed["encode"][0], fixed["decode"][0], fixed["encode"][1],
                                  fixed["decode"][1], t_diffuse, self.slo_slack))
        return out

    # ---- step 1: counts -------------------------------------------------------------------
    def solve(self, forecast: Forecast, current: PlacementPlan | None = None, *, sticky: bool = True
              ) -> PlacementPlan:
        """The plan for `forecast`, staying close to `current` where that costs no goodput.

        `sticky=False`: choose the replica counts as if from scratch (`current` was built for a
        guess, not a measurement), but still keep its groups' places where the counts allow."""
        if not forecast.rates:
            raise ConfigError("cannot plan for an empty forecast")
        start = time.perf_counter()
        classes = self.class_costs(forecast)
        deployments = sorted({cc.encode for cc in classes} | {cc.decode for cc in classes}
                             | {Deployment(cc.cls.model, "diffuse", w) for cc in classes for w in cc.t_diffuse})
        cur = plan_counts(current) if current is not None and sticky else {}
        share = self._fair_share(forecast, classes) if self.fair_share else 0.0
        while True:
            counts, served, stats = self._solve_counts(forecast, classes, deployments, cur, share)
            if stats["status"] != "INFEASIBLE" or share == 0.0:
                break
            share = share / 2 if share > 0.05 else 0.0  # whole groups did not fit that share
        if stats["status"] == "INFEASIBLE":
            raise ConfigError(f"no placement fits {len(classes)} request classes on {self.cluster.nodes}x"
                              f"{self.cluster.gpus_per_node} GPUs (each needs an encode, diffuse and decode group)")
        stats["fair_share"] = share
        if counts is None:
            counts, served = self._greedy_counts(forecast, classes), {}
            stats["fallback"] = True
        counts = self._fill(forecast, classes, counts, served, cur)
        groups, dropped = pack(self.cluster, counts, current)
        goodput = sum(served.values())
        stats.update(dropped_groups=dropped, goodput_rps=goodput, demand_rps=forecast.total_rate,
                     changes_gpus=sum(d.width * abs(counts.get(d, 0) - cur.get(d, 0)) for d in set(counts) | set(cur)),
                     wall_s=time.perf_counter() - start)
        predicted = goodput / forecast.total_rate if forecast.total_rate > 0 and not stats["fallback"] else None
        return PlacementPlan(tuple(groups), predicted, stats)

    def _packing_limits(self, widths: list[int]) -> dict[int, int]:
        """GPUs that groups of width >= w may use in total, per width w."""
        G = self.cluster.gpus_per_node
        return {w: len(self.cluster.up) * (G // w) * w for w in widths}

    def _fair_share(self, forecast, classes) -> float:
        """Share of every class's demand the plan must serve (on time, or late at its efficient
        width): what the cluster could serve of all of it, with a margin. Late work is never
        dropped, so a plan without room for it would be run over anyway; and a class whose
        capacity went to cheaper ones would be served at the narrowest width, for hours."""
        need = 0.0
        for cc in classes:
            w = cc.efficient_width()
            need += forecast.rates[cc.cls] * (cc.t_encode * cc.encode.width + cc.t_decode * cc.decode.width
                                              + cc.t_diffuse[w] * w)
        if need <= 0:
            return 0.0
        return min(1.0, 0.8 * self.utilization * self.cluster.total_gpus / need)

    def _solve_counts(self, forecast, classes, deployments, cur, share: float = 0.0):
        model = cp_model.CpModel()
        total = self.cluster.total_gpus
        n = {d: model.new_int_var(0, total // d.width, f"n_{d.model}_{d.stage}_{d.width}") for d in deployments}
        widths = sorted({d.width for d in deployments})
        for w, limit in self._packing_limits(widths).items():
            model.add(sum(d.width * n[d] for d in deployments if d.width >= w) <= limit)
        cap = round(self.utilization / RATE_UNIT / TIME_UNIT)  # busy-time units one replica offers
        x: dict[tuple[int, int], cp_model.IntVar] = {}
        enc_load: dict[Deployment, list] = {}
        dif_load: dict[Deployment, list] = {}
        for i, cc in enumerate(classes):
            demand = round(forecast.rates[cc.cls] / RATE_UNIT)
            ws = cc.on_time_widths() if demand > 0 else []
            for w in ws:
                x[i, w] = model.new_int_var(0, demand, f"x_{i}_{w}")
                t = math.ceil(cc.t_diffuse[w] / TIME_UNIT)
                dif_load.setdefault(Deployment(cc.cls.model, "diffuse", w), []).append(t * x[i, w])
            floor = int(share * demand)
            if floor > 0:  # late service at the efficient width, up to the fair share
                w = cc.efficient_width()
                z = model.new_int_var(0, floor, f"z_{i}")
                dif_load.setdefault(Deployment(cc.cls.model, "diffuse", w), []).append(
                    math.ceil(cc.t_diffuse[w] / TIME_UNIT) * z)
                ws_z = [z]
            else:
                ws_z = []
            if ws or ws_z:
                y = sum(x[i, w] for w in ws) + sum(ws_z)
                model.add(y <= demand)
                if floor > 0:
                    model.add(y >= floor)
                for dep, t in ((cc.encode, cc.t_encode), (cc.decode, cc.t_decode)):
                    enc_load.setdefault(dep, []).append(math.ceil(t / TIME_UNIT) * y)
            # presence: somewhere to run every stage
            model.add(n[cc.encode] >= 1)
            model.add(n[cc.decode] >= 1)
            model.add(sum(n[Deployment(cc.cls.model, "diffuse", w)] for w in cc.t_diffuse) >= 1)
        # encode and decode keep up with diffuse at full use, not just at `utilization`: diffuse
        # groups run late work back to back, and all of it goes on to decode (flux x4.5: one
        # decode group planned at 0.85 of the on-time work got 1.06 s of decode per second and
        # 23 of 61 misses waited 10-45 s for it)
        cap_fixed = round(self.utilization ** 2 / RATE_UNIT / TIME_UNIT)
        for dep, terms in enc_load.items():
            model.add(sum(terms) <= cap_fixed * n[dep])
        for dep, terms in dif_load.items():
            model.add(sum(terms) <= cap * n[dep])
        # objective: goodput first; each GPU changed costs less than one unit of goodput
        changes = []
        for d in deployments:
            delta = model.new_int_var(0, total, f"chg_{d.model}_{d.stage}_{d.width}")
            model.add_abs_equality(delta, n[d] - cur.get(d, 0))
            changes.append(d.width * delta)
        weight = 2 * total + 1
        model.maximize(weight * sum(x.values()) - sum(changes))
        solver = limited_solver(self.time_limit_s, self.seed, self.num_workers)
        status = solver.solve(model)
        stats = {"status": solver.status_name(status), "solver_wall_s": solver.wall_time,
                 "objective": None, "fallback": False, "variables": len(n) + len(x)}
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            return None, {}, stats
        stats["objective"] = solver.objective_value
        counts = {d: solver.value(v) for d, v in n.items() if solver.value(v) > 0}
        served: dict[RequestClass, float] = {}
        for (i, _w), v in x.items():
            served[classes[i].cls] = served.get(classes[i].cls, 0.0) + solver.value(v) * RATE_UNIT
        # demand was rounded to RATE_UNIT: never predict more than the forecast
        served = {c: min(v, forecast.rates[c]) for c, v in served.items()}
        return counts, served, stats

    def _greedy_counts(self, forecast, classes) -> dict[Deployment, int]:
        """Fallback: one group of each needed deployment (the fill step spreads the rest)."""
        counts: dict[Deployment, int] = {}
        for cc in classes:
            ws = cc.on_time_widths() or [max(cc.t_diffuse)]
            for d in (cc.encode, cc.decode, Deployment(cc.cls.model, "diffuse", ws[0])):
                counts[d] = 1
        if not self._fits(counts):
            raise ConfigError(f"no placement fits {len(classes)} request classes on {self.cluster.total_gpus} GPUs")
        return counts

    # ---- step 2: spread the GPUs left over ---------------------------------------------
    def _loads(self, forecast, classes, served) -> dict[Deployment, float]:
        """Predicted busy GPU-groups per deployment for the full demand: on-time work where the
        solver put it, the rest on each class's most efficient width."""
        load: dict[Deployment, float] = {}
        for cc in classes:
            rate = forecast.rates[cc.cls]
            on_time = served.get(cc.cls, 0.0)
            ws = cc.on_time_widths()
            w_late = cc.efficient_width()
            # spare GPUs go where on-time work runs fastest at little cost: the widest efficient
            # on-time width (queueing eats into the SLO, so the narrowest on-time width is fragile)
            w_on = max((w for w in ws if w <= w_late), default=ws[0] if ws else w_late)
            for dep, t in ((cc.encode, cc.t_encode), (cc.decode, cc.t_decode)):
                load[dep] = load.get(dep, 0.0) + rate * t
            m = cc.cls.model
            load[Deployment(m, "diffuse", w_on)] = load.get(Deployment(m, "diffuse", w_on), 0.0) + on_time * cc.t_diffuse[w_on]
            late = max(rate - on_time, 0.0)
            load[Deployment(m, "diffuse", w_late)] = load.get(Deployment(m, "diffuse", w_late), 0.0) + late * cc.t_diffuse[w_late]
        return load

    def _fits(self, counts: dict[Deployment, int]) -> bool:
        widths = sorted({d.width for d in counts} | {1})
        return all(sum(d.width * k for d, k in counts.items() if d.width >= w) <= limit
                   for w, limit in self._packing_limits(widths).items())

    def _fill(self, forecast, classes, counts, served, cur) -> dict[Deployment, int]:
        """Give leftover GPUs to the deployment with the highest load per replica."""
        counts = dict(counts)
        load = self._loads(forecast, classes, served)
        candidates = sorted(d for d in load if load[d] > 0) or sorted(counts)
        used = sum(d.width * k for d, k in counts.items())
        while used < self.cluster.total_gpus:
            best, best_score = None, -1.0
            for d in candidates:
                counts[d] = counts.get(d, 0) + 1
                ok = self._fits(counts)
                counts[d] -= 1
                if ok:
                    # utilisation per GPU; prefer what the current plan already runs
                    score = load.get(d, 0.0) / max(counts.get(d, 0), 0.5) / d.width
                    score *= 1.05 if cur.get(d, 0) > counts.get(d, 0) else 1.0
                    if score > best_score:
                        best, best_score = d, score
            if best is None:
                break
            counts[best] = counts.get(best, 0) + 1
            used += best.width
        return {d: k for d, k in counts.items() if k > 0}


__all__ = ["ClassCosts", "Deployment", "PlacementSolver", "deployment_of", "group_id", "pack"]
