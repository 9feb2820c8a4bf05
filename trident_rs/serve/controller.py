"""The Controller deployment: hosts the policy layer inside Ray Serve.

A request's path costs at most one round trip per stage, and the replicas never call it:
- `submit` tells of an arrival and returns, with the deadline, the encode grant when the policy
  launches it within 0.1 s (at once when a replica is free; else one `acquire` more);
- `acquire(stage, done=previous grant)` reports the previous stage done and waits for the grant
  of the next one;
- `finish(state, done=last grant)` reports the last stage done and the end of the request (the
  ingress does not wait for it), which also frees anything an unfinished request still held.
Stage replicas `register` when they start and on each heartbeat, and `deregister` when stopped
(`trident_rs.serve.registry`); grants name the replica bound to the policy's group, and
`regrant` moves a grant whose replica is gone. The jobs are split: dispatch in
`trident_rs.serve.broker`, progress and counts in `.request_log`, `/v1/status` and `/metrics`
in `.status_view`. Plans become replica counts published for Serve's autoscaler to follow
(`trident_rs.serve.scaling`). One replica: it is the single source of dispatch truth. If it dies,
Serve restarts it with an empty queue; it then keeps the replica counts last published (not the
empty plan of a policy that has seen no traffic), refuses `acquire` for requests it does not
know (the ingress finishes those on the last plan, see `controller_link`), ignores reports about
them, and rebuilds its replica registry from the next heartbeats.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ray import serve

from trident_rs.errors import UnknownRequestError
from trident_rs.policy.adapters import ADAPTER_LOAD_S
from trident_rs.policy.greedy import GreedyStagePolicy
from trident_rs.policy.interface import Policy
from trident_rs.policy.stage_estimate import default_cost_model
from trident_rs.policy.types import PlacementPlan, Request
from trident_rs.request import RequestState
from trident_rs.serve.broker import MAX_ENDED, Broker
from trident_rs.serve.config import AppConfig
from trident_rs.serve.grant import Grant
from trident_rs.serve.metrics import ServeMetrics
from trident_rs.serve.registry import EXPIRE_S, HEARTBEAT_S
from trident_rs.serve.request_log import RequestLog
from trident_rs.serve.scaling import publish_counts, read_count
from trident_rs.serve.slo import clock_scale, default_slo_s
from trident_rs.serve import status_view
from trident_rs.vocab import STAGES, Shape

logger = logging.getLogger("ray.serve")


def load_cost_model() -> Any:
    """The shipped cost model, or None (the fallback estimate) when it or its profiles are missing."""
    cost = default_cost_model()
    if cost is None:
        logger.warning("no cost model; using the rough fallback estimate")
    return cost


def make_policy(cfg: AppConfig, cost: Any) -> Policy:
    """The configured policy (`trident_rs.policy.registry` names, or 'greedy').

    Falls back to the greedy stage policy, with a warning, when the named policy or the cost
    model is not installed, so the runtime always serves.
    """
    cluster = cfg.cluster.to_cluster()
    initial = {d.name: d.replicas for d in cfg.deployments}
    if cfg.policy.name != "greedy":
        from trident_rs.policy.registry import factory

        cls = factory(cfg.policy.name)  # ConfigError for names it does not know
        if cls is not None and cost is not None:
            return cls(cluster, cost, **_policy_options(cfg, cost))
        logger.warning("policy %r or the cost model is unavailable; using the greedy stage policy",
                       cfg.policy.name)
        return GreedyStagePolicy(cluster, cost, initial)
    return GreedyStagePolicy(cluster, cost, initial, **cfg.policy.options)


def _policy_options(cfg: AppConfig, cost: Any) -> dict[str, Any]:
    """The configured options; for `trident` without a forecast, the served models (those the
    cost model knows) as its prior, so that its first plan is ready before the first request."""
    options = dict(cfg.policy.options)
    if cfg.pool:  # the shared pool: only the widths deployed here (`AppConfig.pool`)
        options.setdefault("widths", {s: cfg.widths(s) for s in STAGES})
    if cfg.policy.name != "trident":
        return options
    # By default trident dispatches on the solver's fixed-width replica groups here; with
    # `placement: pool` it runs the simulator's shared pool (and `elastic` chunks) on slot replicas
    options.setdefault("placement", "groups")
    if options["placement"] == "pool" and cfg.executor != "emulated":
        options.setdefault("chunk_edits", False)  # real executors resume no edit mid-schedule
    if options["placement"] == "groups":  # mirror the replicas' adapter LRUs (policy/adapters.py)
        options.setdefault("lora_slots", cfg.lora_slots)
        # a load costs what an emulated replica sleeps for it: `adapter_load_s` of the cluster
        # emulated, on the controller's clock like the scaled cost model's times
        options["adapter_load_s"] = float(options.get("adapter_load_s", ADAPTER_LOAD_S)) * clock_scale(cfg)
    if not {"forecast", "workload", "models"} & options.keys():
        known = set(cost.models())
        served = [m for m in cfg.models if m in known]
        if served:
            options["models"] = served
            options.setdefault("slo_scale", cfg.slo_scale)
    return options


def _ray_alive_nodes() -> dict[str, float]:
    """The live Ray nodes -> their GPUs."""
    import ray

    return {n["NodeID"]: float(n.get("Resources", {}).get("GPU", 0.0)) for n in ray.nodes() if n.get("Alive")}


def _ray_gpu_nodes() -> dict[str, float]:
    """GPUs of every live Ray node that has any."""
    return {n: gpus for n, gpus in _ray_alive_nodes().items() if gpus > 0}


class Controller:
    def __init__(self, config: dict):
        self.cfg = AppConfig.parse(config)
        self.app_name = serve.get_replica_context().app_name
        self.cost = load_cost_model()  # real-time predictions: the SLO rule is defined on them
        # Emulated executors sleep for the predicted time x time_scale, and so runs this clock:
        # the policy must plan on the same scaled times, or every deadline looks hopeless.
        self.clock_scale = clock_scale(self.cfg)
        scaled = self.cost.scaled(self.clock_scale) if self.cost is not None and self.clock_scale != 1.0 else self.cost
        self.policy = make_policy(self.cfg, scaled)
        self.t0 = time.monotonic()
        self.log = RequestLog(ServeMetrics())
        self.broker = Broker(self.cfg, self.policy, self.now, lambda c: publish_counts(self.app_name, c),
                             on_grant=self.log.granted, metrics=self.log.metrics, evict=self._evict,
                             ray_nodes=_ray_gpu_nodes)
        self._ticker: asyncio.Task | None = None
        self._slo_cache: dict[tuple, float] = {}
        plan = self.policy.initial_plan(0.0) or PlacementPlan(())
        kept = self._published_counts() if not plan.groups and not self.broker.pool else None
        if self.broker.pool:
            self.broker.fixed("shared pool: the configured replicas, each launch mapped to one")
        elif kept:  # a restart: keep the running replicas until the policy's first real plan
            self.broker.keep(kept, "restarted: kept the last published counts")
        else:
            self.broker.publish(plan, "initial plan")

    # read-only views kept for tools and tests
    @property
    def plan(self) -> PlacementPlan:
        return self.broker.plan

    @property
    def counts(self) -> dict[str, int]:
        return self.broker.counts

    @property
    def replans(self) -> Any:
        return self.broker.replans

    @property
    def inflight(self) -> dict:
        return self.broker.inflight

    @property
    def active(self) -> dict:
        return self.log.active

    @property
    def stats(self) -> dict:
        return self.log.stats

    @property
    def progress(self) -> dict:
        return self.log.progress

    def _evict(self, replicas: list[tuple[str, str]]) -> None:
        """Stop these (deployment, replica id) so that Serve starts them again (re-shape defrag)."""
        import ray

        for deployment, replica_id in replicas:
            name = f"SERVE_REPLICA::{self.app_name}#{deployment}#{replica_id}"
            try:
                ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
            except Exception as e:  # noqa: BLE001 - gone already
                logger.info("could not stop %s: %s", name, e)

    # -- time ----------------------------------------------------------------------------------
    def now(self) -> float:
        return time.monotonic() - self.t0

    def _published_counts(self) -> dict[str, int] | None:
        """The counts a previous incarnation of this controller published, if any."""
        try:
            counts = {d.name: read_count(self.app_name, d.name) for d in self.cfg.deployments}
        except Exception:  # noqa: BLE001 - no KV (tests): nothing was published
            return None
        if any(n is None for n in counts.values()) or not any(counts.values()):
            return None
        return {k: int(v) for k, v in counts.items() if v is not None}

    def _ensure_ticker(self) -> None:
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.get_running_loop().create_task(self._tick_loop())

    async def _tick_loop(self) -> None:
        nodes_checked = time.monotonic()
        while True:
            await asyncio.sleep(self.cfg.policy.tick_s)
            try:
                if self.broker.registry.expire(time.monotonic(), EXPIRE_S):
                    logger.warning("stage replicas stopped heartbeating; dropped from the registry")
                if self.broker.registry.nodes and time.monotonic() - nodes_checked >= HEARTBEAT_S:
                    nodes_checked = time.monotonic()
                    try:  # a node lost: the policy re-plans onto the nodes left (`ClusterState.down`)
                        self.broker.nodes_alive(await asyncio.to_thread(_ray_alive_nodes))
                    except Exception:  # noqa: BLE001 - GCS unreachable for now: check next time
                        logger.warning("could not list Ray's nodes; node loss checked next time")
                self.broker.roll()
                self.broker.schedule()
            except Exception:
                logger.exception("policy tick failed")

    def _submit_wait_s(self) -> float:
        """How long `submit` waits for the first grant: short (a request that queues longer pays
        one more round trip, small beside its wait) and well inside the ingress's submit timeout."""
        return min(0.1, self.cfg.faults.controller_timeout_s / 4)

    def _default_slo(self, model: str, shape: Shape, steps: int) -> float:
        key = (model, shape, steps)
        slo = self._slo_cache.get(key)
        if slo is None:
            if len(self._slo_cache) > 4096:
                self._slo_cache.clear()
            slo = self._slo_cache[key] = default_slo_s(self.cost, model, shape, steps, scale=self.cfg.slo_scale,
                                                       clock=self.clock_scale)
        return slo

    def _collect(self, done: Grant | None) -> None:
        """A stage reported done (riding on the next acquire or on finish)."""
        if done is None or done.local:
            return
        took = self.broker.done(done)
        self.log.stage_done(done, took)

    # -- the request path: submit, acquire, finish --------------------------------------------
    async def submit(self, request_id: str, model: str, shape: Shape, steps: int,
                     slo_ms: float | None = None, encode_image: bool = False,
                     lora: list[tuple[str, float]] | None = None) -> dict:
        """A request arrived. Returns its deadline (seconds from now), the current replica counts
        (the ingress dispatches on them if this controller becomes unreachable) and the grant of
        its first stage if the policy launches it within `_submit_wait_s()`. `steps`: the denoising
        steps it runs; `encode_image`: an image edit (its encode stage VAE-encodes the image);
        `lora`: its LoRA adapters as (name, scale), which the policy routes and batches by."""
        self._ensure_ticker()
        if request_id in self.broker.ended or request_id in self.log.active:  # late (the ingress gave up) or twice
            return {"slo_s": 0.0, "counts": dict(self.counts), "ignored": True, "grant": None}
        slo_s = slo_ms / 1000.0 if slo_ms else self._default_slo(model, shape, steps)
        now = self.now()
        lora = list(lora or ())
        self.policy.add_request(Request(request_id, model, shape, steps, now, now + slo_s, encode_image,
                                        tuple(n for n, _ in lora), tuple(float(x) for _, x in lora)), now)
        self.log.submitted(request_id, model, shape.key, steps, now + slo_s, slo_s)
        self.broker.schedule()
        grant = self.broker.take(request_id, STAGES[0])
        if grant is None:
            key = (request_id, STAGES[0])
            fut = self.broker.wait(*key)
            try:
                grant = await asyncio.wait_for(asyncio.shield(fut), self._submit_wait_s())
            except (asyncio.TimeoutError, asyncio.CancelledError):  # a later launch waits in `granted`
                if self.broker.waiters.get(key) is fut:
                    del self.broker.waiters[key]
                grant = fut.result() if fut.done() and not fut.cancelled() else None
        return {"slo_s": slo_s, "counts": dict(self.counts), "grant": grant}

    async def acquire(self, request_id: str, stage: str, done: Grant | None = None) -> Grant:
        """Report `done` (the previous stage) and wait until the policy launches `stage` of the
        request; return the grant. `UnknownRequestError` for a request this controller was never
        told of (it restarted)."""
        self._collect(done)
        grant = self.broker.take(request_id, stage)
        if grant is not None:
            if done is not None:
                self.broker.schedule()
            return grant
        if request_id not in self.log.active:
            raise UnknownRequestError(request_id)
        fut = self.broker.wait(request_id, stage)
        self.broker.schedule()
        try:
            return await fut
        except asyncio.CancelledError:  # the ingress gave up waiting (controller unreachable): a
            key = (request_id, stage)  # later launch of it waits in `granted` until its finish frees it
            if self.broker.waiters.get(key) is fut:
                del self.broker.waiters[key]
            raise

    async def regrant(self, grant: Grant, here: str | None = None) -> Grant:
        """`grant`'s replica is gone (Serve routed the call to `here` instead): the same launch on
        another live replica of its deployment (`here` if free), waiting for one if none is left."""
        if grant.local or grant.batch_id not in self.broker.inflight:
            return grant
        while True:
            new = self.broker.regrant(grant, here)
            if new is not None:
                self.log.granted(new)
                return new
            if grant.request_id not in self.log.active:
                raise UnknownRequestError(grant.request_id)
            await asyncio.sleep(0.1)

    async def stage_retry(self, grant: Grant, attempt: int, error: str = "") -> None:
        """The ingress re-runs a stage whose replica died; the grant stays held until it is done.
        No new group is bound to that replica while Serve replaces it."""
        self.log.retried(grant, error)
        if grant.replica_id is not None:
            self.broker.registry.shun(grant.replica_id, time.monotonic())

    async def finish(self, request_id: str, state: str, done: Grant | None = None) -> None:
        """The request ended in `state` (a final `RequestState`), its last stage being `done`:
        free everything it still holds."""
        final = RequestState(state)
        self._collect(done)
        ok = final is RequestState.DONE
        ended_before = request_id in self.broker.ended
        # a request done on the last plan (no last grant: this controller did not see its last
        # stages) may still have stages the policy will launch: void them, or they hold GPUs forever
        self.broker.release(request_id, ended_unfinished=not ok or done is None)
        if request_id in self.log.active:  # else: not submitted here (restarted controller, late report)
            self.log.finished(request_id, final, self.now())
        elif not ended_before:  # dispatched on the last plan while this controller was down or did not know it:
            key = f"{final.value}_on_last_plan"  # counted once; a submit arriving after this is ignored
            self.log.stats[key] = self.log.stats.get(key, 0) + 1
            self.broker.ended[request_id] = None
            while len(self.broker.ended) > MAX_ENDED:
                self.broker.ended.popitem(last=False)
        self.broker.schedule()

    async def reject(self, reason: str = "") -> None:
        """The ingress refused a request before admission (bad input, unknown model...)."""
        self.log.rejected()

    # -- the replica registry -----------------------------------------------------------------
    async def register(self, replica_id: str, deployment: str, node_id: str, gpu_ids: list | None = None) -> None:
        """A stage replica started, or its heartbeat."""
        self._ensure_ticker()
        if self.broker.registry.register(replica_id, deployment, node_id, gpu_ids or (), time.monotonic()):
            logger.info("stage replica %s of %s registered on node %s", replica_id, deployment, node_id[:12])
            self.broker.roll()  # the re-shape step may be complete
            self.broker.schedule()  # its group may be ready now

    async def deregister(self, replica_id: str) -> None:
        """A stage replica is stopping."""
        self.broker.registry.deregister(replica_id)
        self.broker.roll()

    async def reshape(self, counts: dict[str, int], reason: str = "operator") -> dict[str, int]:
        """Run these replica counts (an operator or a benchmark; the policy's next plan replaces
        them), rolled out as a plan's are. Returns the counts published so far."""
        self.broker.counts = {d.name: int(counts.get(d.name, 0)) for d in self.cfg.deployments}
        self.broker.replans.append({"t": round(self.now(), 3), "wall": time.time(), "reason": reason,
                                    "counts": dict(self.broker.counts)})
        self.broker.roll()
        return dict(self.broker.published or {})

    # -- views ----------------------------------------------------------------------------------
    async def request_status(self, request_id: str) -> dict | None:
        """Progress of one request: queued, running (which stage, where), completed or failed."""
        return self.log.status(request_id)

    async def metrics_text(self) -> str:
        """Prometheus text exposition of the runtime metrics (served by the ingress)."""
        return status_view.metrics_text(self.broker, self.log)

    async def status(self) -> dict:
        """The whole picture: plan per node, replicas, queues, in-flight requests, attainment..."""
        return status_view.status(self.broker, self.log, self.now())


ControllerDeployment = serve.deployment(
    Controller, name="Controller", num_replicas=1, max_ongoing_requests=100_000,
    ray_actor_options={"num_cpus": 0},
)
