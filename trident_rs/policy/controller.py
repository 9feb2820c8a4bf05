"""Re-planning: watch the workload, detect a shift, re-solve, move to the new plan safely.

- `ArrivalWindow` keeps the last `window_s` seconds of arrivals and finishes: rate, class mix,
  attainment, and a `Forecast` of them.
- `Controller.check()` compares the window with the forecast the current plan was built for.
  A shift is any of: total-variation distance between the class mixes >= `mix_threshold`;
  rate ratio outside [1/`rate_ratio`, `rate_ratio`]; attainment below the plan's prediction by
  `attainment_dip`. A mix shift must also stand out from sampling noise (`mix_noise_sigmas`
  standard deviations of the distance n arrivals drawn from the planned mix would show). Hysteresis: the shift must be seen on `persist_checks` consecutive checks,
  and plans change at most once per `cooldown_s`.
- `Transition` moves from the current plan to a target plan in steps that never over-commit a
  node: groups to remove first *drain* (no new work; they stay in the plan while busy), and a
  new group joins the plan only once every one of its GPUs is free (not in any group of the
  plan, draining ones included, and idle in the cluster). A new group whose GPUs are still
  held moves to another aligned block of idle GPUs if there is one (long drains must not keep
  the target from taking shape while other GPUs sit idle); groups of deployments the running
  plan lacks take free GPUs first; the transition ends once nothing drains. Re-plans forecast the window's classes plus every class with unfinished requests.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Iterable
from dataclasses import dataclass, field

from trident_rs.errors import ConfigError
from trident_rs.policy.packing import deployment_of, group_id
from trident_rs.policy.solver import PlacementSolver
from trident_rs.policy.types import PlacementPlan, ReplicaGroup, Request
from trident_rs.policy.workload import Forecast, RequestClass


@dataclass(frozen=True)
class ControllerConfig:
    window_s: float = 60.0
    check_interval_s: float = 5.0
    min_arrivals: int = 20
    mix_threshold: float = 0.25
    rate_ratio: float = 1.5
    attainment_dip: float = 0.2
    persist_checks: int = 2
    cooldown_s: float = 60.0
    # a mix shift must also exceed what sampling alone gives a window of n arrivals this many
    # standard deviations out (13 classes and 60 arrivals differ by ~0.2 from their true mix)
    mix_noise_sigmas: float = 2.0
    # a prior (provisional) plan is replaced once the window holds this many real arrivals: at a
    # low rate a window may never hold `min_arrivals`, and a handful already beats the prior
    prior_min_arrivals: int = 5
    # how many arrivals the prior's class mix counts as (Dirichlet pseudo-counts): a re-plan
    # plans for (observed counts + prior_weight x prior mix) / (n + prior_weight) at the observed
    # rate, so a class not seen yet in a short window keeps its share until evidence outweighs
    # it. Off by default: on the suite it cost attainment (RESULTS.md, "tried")
    prior_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.window_s <= 0 or self.check_interval_s <= 0 or self.cooldown_s < 0:
            raise ConfigError("controller window_s and check_interval_s must be > 0, cooldown_s >= 0")
        if not 0 < self.mix_threshold <= 1 or self.rate_ratio <= 1 or self.persist_checks < 1:
            raise ConfigError("controller needs 0 < mix_threshold <= 1, rate_ratio > 1, persist_checks >= 1")
        if self.mix_noise_sigmas < 0 or self.prior_min_arrivals < 1 or self.prior_weight < 0:
            raise ConfigError("controller needs mix_noise_sigmas >= 0, prior_min_arrivals >= 1, prior_weight >= 0")


def mix_distance(a: dict, b: dict) -> float:
    """Total-variation distance between two class mixes (0 = same, 1 = disjoint)."""
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))


class ArrivalWindow:
    """Arrivals and finishes of the last `window_s` seconds."""

    def __init__(self, window_s: float, min_span_s: float = 0.0):
        self.window_s = window_s
        self.min_span_s = min(min_span_s, window_s)  # floor on the span rates are measured over
        self.arrivals: deque[tuple[float, Request]] = deque()
        self.finishes: deque[tuple[float, bool]] = deque()  # (time, on time)
        self.first_arrival: float | None = None

    def add(self, request: Request, now: float) -> None:
        if self.first_arrival is None:
            self.first_arrival = now
        self.arrivals.append((now, request))

    def finish(self, on_time: bool, now: float) -> None:
        self.finishes.append((now, on_time))

    def trim(self, now: float) -> None:
        for q in (self.arrivals, self.finishes):
            while q and q[0][0] < now - self.window_s:
                q.popleft()

    def span(self, now: float) -> float:
        """Seconds the window covers (shorter at the start of a run)."""
        if self.first_arrival is None:
            return 0.0
        return max(min(self.window_s, now - self.first_arrival), self.min_span_s, 1e-9)

    def forecast(self, now: float) -> Forecast:
        self.trim(now)
        return Forecast.from_requests((r for _, r in self.arrivals), max(self.span(now), 1e-3))

    def attainment(self) -> float | None:
        return sum(ok for _, ok in self.finishes) / len(self.finishes) if self.finishes else None


def mix_noise(mix: dict, n: int) -> float:
    """Standard deviation scale of the total-variation distance between `mix` and the mix of
    `n` arrivals drawn from it: 0.5 * sum_k sqrt(p_k (1 - p_k) / n)."""
    if n <= 0:
        return 1.0
    return 0.5 * sum(math.sqrt(p * (1.0 - p) / n) for p in mix.values())


def with_prior(observed: Forecast, prior: Forecast | None, n: int, weight: float) -> Forecast:
    """The posterior mean class mix of `n` observed arrivals under a Dirichlet prior that counts
    `weight` arrivals of `prior`'s mix, at the observed total rate. Classes match by key (model,
    shape, steps); a class only the prior has keeps the prior's SLO."""
    if prior is None or not prior.rates or weight <= 0 or observed.total_rate <= 0:
        return observed
    total = observed.total_rate
    obs_mix, prior_mix = observed.mix(), prior.mix()
    by_key = {c.key: c for c in prior.rates} | {c.key: c for c in observed.rates}
    rates: dict[RequestClass, float] = {}
    for key, c in by_key.items():
        share = (n * obs_mix.get(key, 0.0) + weight * prior_mix.get(key, 0.0)) / (n + weight)
        if share > 0:
            rates[c] = total * share
    return Forecast(rates)


def with_backlog(forecast: Forecast, pending: Iterable[Request], horizon_s: float) -> Forecast:
    """`forecast` plus every class of the unfinished requests (`pending`) it lacks, at their
    count spread over `horizon_s` seconds (classes match by model, shape and steps)."""
    known = {c.key for c in forecast.rates}
    extra: dict[tuple, RequestClass] = {}
    rates = dict(forecast.rates)
    for r in pending:
        key = (r.model, r.shape, r.steps)
        if key in known:
            continue
        c = extra.setdefault(key, RequestClass.of(r))
        rates[c] = rates.get(c, 0.0) + 1.0 / max(horizon_s, 1e-3)
    return Forecast(rates)


@dataclass
class Transition:
    """From `current` to `target`, draining before removing; see the module docstring."""

    target: PlacementPlan
    reason: str
    draining: set[str] = field(default_factory=set)
    gpus_per_node: int = 0  # > 0: a target group whose GPUs are held moves to a free block

    def step(self, current: PlacementPlan, busy: frozenset[str], free_gpus: dict[int, frozenset[int]]
             ) -> tuple[PlacementPlan, bool]:
        """The plan to run now and whether the transition is complete."""
        target_ids = {g.id: g for g in self.target.groups}
        keep: list[ReplicaGroup] = []
        self.draining = set()
        for g in current.groups:
            same = target_ids.get(g.id)
            if same is not None and (same.node, same.gpus) == (g.node, g.gpus):
                keep.append(g)
            elif g.id in busy:  # still running: keep its GPUs until it drains
                keep.append(g)
                self.draining.add(g.id)
        held = {(g.node, i) for g in keep for i in g.gpus}
        have = {g.id for g in keep}
        waiting = 0
        moved: dict[str, ReplicaGroup] = {}
        # groups of a deployment the running plan lacks go first: the GPUs that free up must
        # not all go to more replicas of deployments that already run while, say, the only
        # encode group of a model waits (its queue would starve behind long drains)
        running = {deployment_of(g) for g in keep if g.id not in self.draining}
        for g in sorted(self.target.groups, key=lambda g: deployment_of(g) in running):
            if g.id in have:
                continue
            if any((g.node, i) in held or i not in free_gpus.get(g.node, ()) for i in g.gpus):
                alt = self._relocate(g, held, free_gpus)
                if alt is None:
                    waiting += 1
                    continue
                moved[g.id] = g = alt
            keep.append(g)
            have.add(g.id)
            held.update((g.node, i) for i in g.gpus)
        if moved:  # the target now names the groups where they went
            self.target = PlacementPlan(tuple(moved.get(g.id, g) for g in self.target.groups),
                                        self.target.predicted_attainment, self.target.stats)
        # nothing drains and still no room (fragmented by moved groups): run without the rest
        done = not self.draining
        stats = dict(self.target.stats, transition_waiting=waiting, transition_draining=len(self.draining))
        return PlacementPlan(tuple(keep), self.target.predicted_attainment, stats), done

    def _relocate(self, g: ReplicaGroup, held: set, free_gpus: dict[int, frozenset[int]]) -> ReplicaGroup | None:
        """`g` on an aligned block of GPUs that are idle and in no group (kept or targeted):
        GPUs the target wanted may stay busy for long (draining work) while others sit idle."""
        G = self.gpus_per_node
        if G <= 0:
            return None
        ids = {t.id for t in self.target.groups}
        for node in sorted(free_gpus):
            free = free_gpus[node]
            for start in range(0, G - g.width + 1, g.width):
                block = tuple(range(start, start + g.width))
                if any(i not in free or (node, i) in held for i in block):
                    continue
                gid = base = group_id(g.model, g.stages[0], g.width, node, start)
                k = 0
                while gid in ids:  # a target group still waiting elsewhere has this id
                    k += 1
                    gid = f"{base}.{k}"
                return ReplicaGroup(gid, g.model, g.stages, g.width, node, block)
        return None


class Controller:
    """Sliding-window monitor + shift detection + re-solve; hands out `Transition`s."""

    def __init__(self, solver: PlacementSolver, config: ControllerConfig | None = None):
        self.solver = solver
        self.config = config or ControllerConfig()
        # rates over at least one check interval: the first arrival alone is not 1,000 req/s
        self.window = ArrivalWindow(self.config.window_s, self.config.check_interval_s)
        self.planned_for: Forecast | None = None  # the forecast behind the current plan
        self.prior: Forecast | None = None  # the prior mix re-plans blend with (see `with_prior`)
        self.provisional = False  # planned_for is a prior, not measured: replace it after a few arrivals
        self.predicted_attainment: float | None = None
        self.last_replan: float = float("-inf")
        self.last_check: float = float("-inf")
        self.strikes = 0
        self.replans = 0

    def observe_arrival(self, request: Request, now: float) -> None:
        self.window.add(request, now)

    def observe_finish(self, request: Request, now: float) -> None:
        self.window.finish(now <= request.deadline + 1e-9, now)

    def planned(self, forecast: Forecast, plan: PlacementPlan, now: float, provisional: bool = False) -> None:
        """Record that `plan` (built for `forecast`) is now the target. A `provisional` forecast
        (a prior, see `workload.prior_forecast`) is re-planned once `prior_min_arrivals` real
        arrivals are in the window, without waiting for persistence or the cooldown."""
        self.planned_for = forecast
        self.provisional = provisional
        if provisional:
            self.prior = forecast
        self.predicted_attainment = plan.predicted_attainment
        self.last_replan = now
        self.strikes = 0

    def shift_reason(self, now: float) -> str:
        """Why the window differs from the plan's forecast ('' = it does not)."""
        cfg = self.config
        n = len(self.window.arrivals)
        if self.provisional:
            return "first arrivals (replacing the prior)" if n >= min(cfg.prior_min_arrivals, cfg.min_arrivals) else ""
        if n < cfg.min_arrivals:
            return ""
        if self.planned_for is None or not self.planned_for.rates:
            return "first window"
        observed = with_prior(self.window.forecast(now), self.prior, n, cfg.prior_weight)
        planned_mix = self.planned_for.mix()
        d = mix_distance(observed.mix(), planned_mix)
        noise = cfg.mix_noise_sigmas * mix_noise(planned_mix, len(self.window.arrivals))
        if d >= max(cfg.mix_threshold, noise):
            return f"mix shift (distance {d:.2f})"
        ratio = observed.total_rate / max(self.planned_for.total_rate, 1e-9)
        # a window of n Poisson arrivals measures the rate to about 1/sqrt(n) (relative)
        limit = max(math.log(cfg.rate_ratio), cfg.mix_noise_sigmas / math.sqrt(max(n, 1)))
        if abs(math.log(max(ratio, 1e-9))) > limit:
            return f"rate change (x{ratio:.2f})"
        att = self.window.attainment()
        if (att is not None and self.predicted_attainment is not None and len(self.window.finishes) >= cfg.min_arrivals
                and att < self.predicted_attainment - cfg.attainment_dip):
            return f"attainment dip ({att:.2f} < predicted {self.predicted_attainment:.2f})"
        return ""

    def check(self, now: float, current: PlacementPlan | None, pending: Iterable[Request] = ()) -> Transition | None:
        """A transition to a new plan if the workload shifted (with hysteresis), else None."""
        cfg = self.config
        if now - self.last_check < cfg.check_interval_s:
            return None
        self.last_check = now
        reason = self.shift_reason(now)
        if not reason:
            self.strikes = 0
            return None
        first = self.provisional or self.planned_for is None or not self.planned_for.rates
        self.strikes += 1
        if not first and (self.strikes < cfg.persist_checks or now - self.last_replan < cfg.cooldown_s):
            return None
        return self.replan(now, current, reason, pending)

    def replan(self, now: float, current: PlacementPlan | None, reason: str,
               pending: Iterable[Request] = ()) -> Transition | None:
        """Re-solve for the window's forecast plus the backlog: every class with a request still
        unfinished (`pending`) is in the forecast, so the new plan keeps a group for it (else
        its queued stages would wait forever for a group the plan dropped)."""
        pending = list(pending)
        observed = self.window.forecast(now)
        blended = with_prior(observed, self.prior, len(self.window.arrivals), self.config.prior_weight)
        forecast = with_backlog(blended, pending, self.config.window_s)
        if not forecast.rates:  # no recent arrival and no backlog: nothing to plan for
            return None
        try:
            plan = self.solver.solve(forecast, current, sticky=not self.provisional)
        except ConfigError:
            if blended is observed:
                raise
            # the prior's classes do not all fit beside the observed ones: plan for what was seen
            forecast = with_backlog(observed, pending, self.config.window_s)
            plan = self.solver.solve(forecast, current, sticky=not self.provisional)
        self.planned(forecast, plan, now)
        self.replans += 1
        return Transition(plan, reason, gpus_per_node=self.solver.cluster.gpus_per_node)
