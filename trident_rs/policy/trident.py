"""trident, our stage-level policy, in its two placements (`make_trident`).

- `placement="pool"` (the simulator's default): `StagePoolPolicy`, each stage launched on a
  shared GPU pool at its own width (`policy/stage_pool.py`).
- `placement="groups"`: `TridentPolicy` below, what the Serve runtime runs today (its stage
  deployments are fixed-width replica groups): placement solver + dispatcher + controller.

`TridentPolicy`: our stage-level policy = placement solver + dispatcher + controller.

Each request runs encode -> diffuse -> decode as three launches on separate replica groups
(encode and decode on narrow groups, diffuse on groups of several widths), so decode never
holds the GPUs of a wide diffuse group. The plan comes from `PlacementSolver` (from a forecast
given in the options, or learned from the first arrivals); the `Controller` re-plans when the
mix or rate shifts, and new plans are returned through `SchedulerOutput.new_plan`. Nodes lost
or back (`ClusterState.down` changed) re-plan at once onto the nodes up.

Options (all keyword): forecast (Forecast), workload (a published trace name or CSV path, read
for its class mix), models (model -> share of GPU time, or a list of models with equal shares:
with neither forecast nor workload, the first plan is built for `workload.prior_forecast` of
them, so it is ready before the first request and is replaced at the first window of real
arrivals), slo_scale (for `workload` and `models`), solver_time_limit_s, utilization, slo_slack, replan
(bool), controller (ControllerConfig or dict), tick_s, and the `Dispatcher` options
(mode, late_width, late_delay_s, max_batch, batch_max_pixels, and for LoRA adapters adapter_routing,
adapter_load_s, lora_slots: `policy/adapters.py`).
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from trident_rs.errors import ConfigError
from trident_rs.policy.controller import Controller, ControllerConfig, Transition
from trident_rs.policy.dispatcher import Dispatcher
from trident_rs.policy.interface import Policy
from trident_rs.policy.packing import pack, plan_counts
from trident_rs.policy.solver import PlacementSolver
from trident_rs.policy.types import Cluster, ClusterState, Launch, PlacementPlan, Request, SchedulerOutput, STAGES
from trident_rs.policy.traces import read_named_trace
from trident_rs.policy.workload import Forecast, forecast_from_trace, prior_forecast

if TYPE_CHECKING:
    from trident_rs.policy.cost_model import CostModel

_DISPATCH_OPTIONS = ("mode", "late_width", "late_delay_s", "max_batch", "batch_max_pixels", "exact_max_tasks",
                     "on_time_width", "adapter_routing", "adapter_load_s", "lora_slots")


PLACEMENTS = ("pool", "groups")


def make_trident(cluster: Cluster, cost: "CostModel", placement: str = "pool", **options: Any) -> Policy:
    """The `trident` policy: stage-level dispatch on a shared pool, or on the solver's groups."""
    if placement == "pool":
        from trident_rs.policy.stage_pool import StagePoolPolicy

        return StagePoolPolicy(cluster, cost, **options)
    if placement == "groups":
        return TridentPolicy(cluster, cost, **options)
    raise ConfigError(f"trident placement must be one of {PLACEMENTS}, got {placement!r}")


class TridentPolicy(Policy):
    name = "trident"

    def __init__(self, cluster: Cluster, cost: "CostModel", **options: Any):
        known = {"forecast", "workload", "models", "slo_scale", "solver_time_limit_s", "utilization", "replan",
                 "controller", "tick_s", "seed", "slo_slack", *_DISPATCH_OPTIONS}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown trident option(s) {unknown}; known: {sorted(known)}")
        self.cluster, self.cost = cluster, cost
        self.solver = PlacementSolver(cluster, cost, time_limit_s=options.get("solver_time_limit_s", 0.5),
                                      utilization=options.get("utilization", 0.85), seed=options.get("seed", 0),
                                      slo_slack=options.get("slo_slack", 0.4))
        ctl = options.get("controller")
        config = ctl if isinstance(ctl, ControllerConfig) else ControllerConfig(**(ctl or {}))
        self.controller = Controller(self.solver, config)
        self.dispatcher = Dispatcher(cost, gpu_memory_gb=cluster.gpu_memory_gb, max_width=cluster.gpus_per_node,
                                     **{k: options[k] for k in _DISPATCH_OPTIONS if k in options})
        self.replan_enabled = bool(options.get("replan", True))
        # events drive dispatch; ticks only run the controller's checks and plan transitions
        self.tick_s = float(options.get("tick_s", config.check_interval_s))
        if self.tick_s <= 0:
            raise ConfigError(f"tick_s must be > 0, got {self.tick_s}")
        self.forecast: Forecast | None = options.get("forecast")
        if self.forecast is None and options.get("workload"):
            self.forecast = forecast_from_trace(read_named_trace(options["workload"]), cost,
                                                options.get("slo_scale", 4.0))
        self._provisional = False  # the forecast is a prior (from `models`), not measured
        if self.forecast is None and options.get("models"):
            models = options["models"]
            shares = dict(models) if isinstance(models, dict) else dict.fromkeys(models, 1.0)
            self.forecast = prior_forecast(cost, shares, cluster.total_gpus, cluster.gpus_per_node,
                                           cluster.gpu_memory_gb, options.get("slo_scale", 4.0),
                                           self.solver.utilization)
            self._provisional = True
        self.plan = PlacementPlan(())
        self.transition: Transition | None = None
        self._served: set[tuple] = set()  # (model, shape, steps) the current target plan can run
        self._unserved_seen = False
        self._transition_since = 0.0

    # ---- Policy interface ------------------------------------------------------------------
    def initial_plan(self, now: float) -> PlacementPlan | None:
        if self.forecast is not None and self.forecast.rates:
            self.plan = self.solver.solve(self.forecast)
            self.controller.planned(self.forecast, self.plan, now, provisional=self._provisional)
            self._served = set()
        return self.plan

    def add_request(self, request: Request, now: float) -> None:
        for stage in STAGES:
            need = self.cost.min_width(request.model, stage, request.shape, self.cluster.gpu_memory_gb)
            if need > self.cluster.gpus_per_node:
                raise ConfigError(f"request {request.id}: {stage} of {request.shape.key} needs {need} GPUs; "
                                  f"nodes have {self.cluster.gpus_per_node}")
        self.dispatcher.add(request)
        self.controller.observe_arrival(request, now)
        key = (request.model, request.shape, request.steps)
        if key not in self._served and not self._can_serve(request):
            self._unserved_seen = True
        else:
            self._served.add(key)

    def on_launch_done(self, launch: Launch, now: float) -> None:
        requests = {rid: self.dispatcher.requests[rid] for rid in launch.request_ids}
        for rid in self.dispatcher.on_done(launch):
            self.controller.observe_finish(requests[rid], now)

    def on_launch_refused(self, launch: Launch, now: float) -> None:
        self.dispatcher.on_refused(launch)

    @property
    def demoted(self) -> set[str]:
        """Requests whose stage the dispatcher demoted to the late tier."""
        return self.dispatcher.demoted

    def schedule(self, state: ClusterState) -> SchedulerOutput:
        now = state.now
        reason = ""
        if state.down != self.cluster.down:
            self._nodes_changed(state.down, now)
        if self.transition is not None and now - self._transition_since > self.controller.config.cooldown_s:
            # still waiting on long drains a cooldown later: keep the (valid) plan reached so
            # far and let the controller re-plan from it, rather than block re-planning
            self.transition = None
        if self.transition is None:
            pending = self.dispatcher.requests.values()
            if not self._unserved_seen and self.dispatcher.queued() and not self.dispatcher.running:
                # nothing runs but work waits: make sure each queued class still has its groups
                self._unserved_seen = not all(self._can_serve(t.request) for t in self.dispatcher.class_heads())
            if self._unserved_seen:
                self.transition = self.controller.replan(now, self.plan, "a request class has no group", pending)
                self._unserved_seen, self._served = False, set()
            elif self.replan_enabled:
                self.transition = self.controller.check(now, self.plan, pending)
            if self.transition is not None:
                reason = self.transition.reason
                self._transition_since = now
        new_plan = None
        draining: set[str] = set()
        before = {g.id: g for g in self.plan.groups}  # what the runtime runs before this call
        if self.transition is not None:
            plan, done = self.transition.step(self.plan, self.dispatcher.busy_groups(), state.free_gpus)
            draining = set(self.transition.draining)
            reason = reason or self.transition.reason
            if list(plan.groups) != list(self.plan.groups):
                self.plan = new_plan = plan
            if done:
                self.transition = None
        # The runtime applies `new_plan` before our launches, and its new groups start then (ready
        # after the start cost). So launch only on groups the runtime reported started and idle
        # *and* that this call leaves unchanged: a new group may reuse the id of a removed idle
        # one (same model, stage, width, node and first GPU; other GPUs), and that id is in
        # `ready_groups` although the new group is only starting.
        # Groups running our launches go to the dispatcher too (it never launches on them): it
        # needs them to tell when a busy wide group would still serve a task on time.
        running = self.dispatcher.running
        groups = [g for g in self.plan.groups if g.id not in draining and before.get(g.id) == g
                  and (g.id in state.ready_groups or g.id in running)]
        launches = self.dispatcher.dispatch(now, groups, state.free_gpus)
        return SchedulerOutput(tuple(launches), new_plan, reason if new_plan is not None else "")

    def next_wakeup(self, now: float) -> float | None:
        if self.dispatcher.pending() or self.transition is not None:
            return now + self.tick_s
        return None

    def pending(self) -> int:
        return self.dispatcher.pending()

    # ---- helpers ---------------------------------------------------------------------------
    def _nodes_changed(self, down: frozenset[int], now: float) -> None:
        """Nodes were lost or came back: re-plan onto the nodes up now, at once (a capacity
        change, not a load shift: no persistence, no cooldown). With no recent arrivals to
        plan for, the forecast the current plan was built for is solved again on the nodes up."""
        lost, back = sorted(down - self.cluster.down), sorted(self.cluster.down - down)
        self.cluster = replace(self.cluster, down=down)
        self.solver.cluster = self.cluster
        if not self.cluster.up:
            return  # nothing left to place on: keep the plan until a node is back
        reason = "; ".join(part for part in (f"node(s) {lost} lost" if lost else "",
                                             f"node(s) {back} back" if back else "") if part)
        try:
            transition = self.controller.replan(now, self.plan, reason, self.dispatcher.requests.values())
        except ConfigError:  # the classes seen no longer all fit on the nodes left
            transition = None
        if transition is None:
            target, forecast = None, self.controller.planned_for
            if forecast is not None and forecast.rates:
                try:
                    target = self.solver.solve(forecast, self.plan)
                except ConfigError:  # its classes do not all fit on the nodes left
                    pass
            if target is None:
                target = PlacementPlan(tuple(pack(self.cluster, plan_counts(self.plan), self.plan)[0]))
            transition = Transition(target, reason, gpus_per_node=self.cluster.gpus_per_node)
        self.transition, self._transition_since = transition, now
        self._served = set()

    def _can_serve(self, request: Request) -> bool:
        """Whether the plan being moved to has a group for every stage of `request`, its diffuse
        at least as wide as the request's ideal width (on time, else efficient)."""
        plan = self.transition.target if self.transition is not None else self.plan
        for stage in STAGES:
            need = self.dispatcher.min_width(request.model, stage, request.shape)
            if stage == "diffuse":
                need = max(need, self.dispatcher.ideal_diffuse(request)[0])
            if not any(g.model == request.model and g.stages == (stage,) and g.width >= need for g in plan.groups):
                return False
        return True
