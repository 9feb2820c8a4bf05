"""The broker: runs the policy and turns its launches into grants (the controller's dispatch job).

It holds the policy, the running plan and what is in flight: launches and the requests each
still holds, grants made but not yet collected, and requests waiting for a grant. The policy
sees a `ClusterState` built from the launches in flight and from the registry of real
replicas (`trident_rs.serve.registry`): a plan group is ready when a live replica is bound to
it and it runs nothing. Plans become replica counts published for Serve's autoscaler
(`trident_rs.serve.scaling`). No Serve calls here: the controller deployment wraps it.

A shared-pool policy (`AppConfig.pool`: no plan, each launch picks node, GPUs and width) runs
on fixed replica counts (the configured ones): a launch goes to the live replica of
`<stage>-w<width>` on its node (Ray node index) with the fewest launches in flight, and its grant
names that replica and the GPU ids the policy gave it. A diffuse chunk (`Launch.steps`) is one
launch: the request comes back at each boundary (`acquire` carrying the chunk's grant), and
the policy grants its next chunk there, or on another replica at another width, or later
(paused); a policy that never grants it again is a preemption.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from typing import Any

from trident_rs.policy.interface import Policy
from trident_rs.policy.types import ClusterState, Launch, PlacementPlan
from trident_rs.vocab import STAGES, DeploymentKey, Stage
from trident_rs.serve.config import AppConfig
from trident_rs.serve.grant import Grant
from trident_rs.serve.registry import ReplicaRegistry

logger = logging.getLogger("ray.serve")
MAX_ENDED = 100_000
DEFRAG_AFTER_S = 8.0  # a re-shape still waiting for room this long: make room for its widest replica
GIVE_UP_S = 60.0  # ... and this long: stop holding narrower replicas back for it


class Broker:
    def __init__(self, cfg: AppConfig, policy: Policy, now: Callable[[], float],
                 publish: Callable[[dict[str, int]], None], on_grant: Callable[[Grant], None] = lambda g: None,
                 metrics: Any = None, evict: Callable[[list[tuple[str, str]]], None] | None = None,
                 ray_nodes: Callable[[], dict[str, float]] | None = None):
        """`evict([(deployment, replica id)])` stops replicas so that Serve starts them again
        elsewhere; `ray_nodes()` gives the GPUs of every live Ray node (both None: no defrag)."""
        self.cfg, self.policy, self.now, self._publish_counts = cfg, policy, now, publish
        self.on_grant, self.metrics, self.evict, self.ray_nodes = on_grant, metrics, evict, ray_nodes
        self.defrags: list[dict] = []
        self.cluster = cfg.cluster.to_cluster()
        self.registry = ReplicaRegistry(plan_nodes=self.cluster.nodes)
        self.plan: PlacementPlan = PlacementPlan(())
        self.counts: dict[str, int] = {}  # the plan's counts (the target)
        self.published: dict[str, int] | None = None  # what Serve is told to run now
        self._waiting_since: float | None = None  # since when a re-shape waits for room
        self._defrag_t = 0.0
        self.replans: deque[dict] = deque(maxlen=50)
        self._ids = itertools.count()
        self.inflight: dict[int, tuple[Launch, set[str]]] = {}
        self.launch_t: dict[int, float] = {}  # launch id -> monotonic start
        self.granted: dict[tuple[str, str], Grant] = {}
        self.waiters: dict[tuple[str, str], asyncio.Future] = {}
        self.ended: OrderedDict[str, None] = OrderedDict()  # ended unfinished: later launches are void
        self.pool = cfg.pool  # a shared-pool policy: fixed replica counts, launches mapped to replicas
        self.on_replica: dict[int, str] = {}  # pool: launch id -> the replica it was granted to

    # -- plan --------------------------------------------------------------------------------------
    def publish(self, plan: PlacementPlan, reason: str) -> None:
        if (getattr(plan, "stats", None) or {}).get("fallback"):  # the solver timed out (policy layer)
            reason += " (the solver found no plan within its time limit: greedy plan)"
        enabled = {d.name for d in self.cfg.deployments}
        counts = {name: 0 for name in enabled}
        for name, n in plan.count().items():
            if name in enabled:  # Serve bounds it by max_replicas anyway; publish what will run
                counts[name] = min(n, self.cfg.max_replicas(self.cfg.deployment(name)))
            else:
                logger.warning("plan asks for %s which this app does not deploy; ignored", name)
        if self.replans and self.metrics is not None:
            self.metrics.replan()
        self.plan, self.counts = plan, counts
        self.replans.append({"t": round(self.now(), 3), "wall": time.time(), "reason": reason, "counts": counts})
        self.roll()

    def roll(self) -> None:
        """Move the counts Serve runs toward the plan's without fragmenting nodes.

        Serve and Ray place replicas where they like; on one node GPUs are interchangeable, but
        on several a wide STRICT_PACK group needs that many free GPUs on one node. So, when the
        replicas reserve GPUs on more than one Ray node: decreases are published at once;
        increases, widest first, only as far as they fit now, best fit, into the GPUs each node
        has free (its GPUs less those of the registered replicas on it, less those of replicas
        published and not yet running); the rest on a later call (each registration, each
        deregistration, each tick). A wide replica that has waited `DEFRAG_AFTER_S` although the
        cluster has the GPUs gets room (`defrag`). Otherwise (one node, no GPUs reserved, no
        replica registered yet) the counts are published at once."""
        target = self.counts
        nodes = self._gpu_nodes() if self.registry.enabled and self.cfg.reserve_gpus and not self.pool else {}
        if self.published is None or len(nodes) <= 1:
            if target != self.published:
                self.published = dict(target)
                self._publish_counts(dict(target))
            self._waiting_since = None
            return
        pub = dict(self.published)
        width = {d.name: d.width for d in self.cfg.deployments}
        for d, n in target.items():  # decreases at once
            pub[d] = min(pub.get(d, 0), n)
        free = dict(nodes)
        for info in self.registry.replicas.values():
            if info.node_id in free:
                free[info.node_id] -= width.get(info.deployment, 1)
        live = self.registry.live_counts()

        def place(w: int) -> bool:
            fits = [n for n, f in free.items() if f >= w]
            if not fits:
                return False
            best = min(fits, key=lambda n: free[n])  # best fit: keep whole nodes whole
            free[best] -= w
            return True

        pending = sorted((width[d] for d in pub for _ in range(max(0, pub[d] - live.get(d, 0)))), reverse=True)
        for w in pending:  # published, not running yet: Ray is placing them
            place(w)
        now = time.monotonic()
        patient = self._waiting_since is None or now - self._waiting_since < GIVE_UP_S
        for d in sorted(target, key=lambda d: -width[d]):
            while pub.get(d, 0) < target[d] and place(width[d]):
                pub[d] = pub.get(d, 0) + 1
            if patient and width[d] > 1 and (pub.get(d, 0) < target[d] or live.get(d, 0) < pub.get(d, 0)):
                break  # narrower increases wait until this one runs: Ray would put them in its way
        short = [d for d in target if pub.get(d, 0) < target[d] or live.get(d, 0) < pub.get(d, 0)]
        if short and self._waiting_since is not None and now - self._waiting_since >= DEFRAG_AFTER_S \
                and now - self._defrag_t >= DEFRAG_AFTER_S:
            self._defrag_t = now
            for dep, n in Counter(d for d, _ in self.defrag(max(short, key=lambda d: width[d]))).items():
                pub[dep] = max(0, min(pub.get(dep, 0), live.get(dep, 0)) - n)  # back once the wide one runs
        if pub != self.published:
            self.published = pub
            self._publish_counts(dict(pub))
        if not short:
            self._waiting_since = None
        elif self._waiting_since is None:
            self._waiting_since = now

    def _gpu_nodes(self) -> dict[str, float]:
        try:
            nodes = dict(self.ray_nodes()) if self.ray_nodes is not None else {}
        except Exception:  # noqa: BLE001 - no node list: the registry's nodes, at the configured size
            nodes = {}
        for node_id in self.registry.nodes:
            nodes.setdefault(node_id, float(self.cluster.gpus_per_node))
        return nodes

    def defrag(self, deployment: str) -> list[tuple[str, str]]:
        """A replica of `deployment` (width w, one STRICT_PACK group) does not start: no node has
        w free GPUs, though narrower replicas scattered over the nodes hold what it needs.
        Stop the fewest idle narrower replicas on the node that needs the fewest moved; `roll`
        publishes their deployments one replica fewer each until the wide one runs. Returns the
        (deployment, replica id) stopped."""
        if self.evict is None:
            return []
        w = self.cfg.deployment(deployment).width
        nodes = self._gpu_nodes()
        busy = {self.registry.bound.get(l.group_id) for l, _ in self.inflight.values() if l.group_id}
        best: list[tuple[str, str, int]] | None = None
        for node_id, gpus in nodes.items():
            here = [(r, i.deployment, self.cfg.deployment(i.deployment).width)
                    for r, i in self.registry.replicas.items() if i.node_id == node_id]
            free = gpus - sum(x[2] for x in here)
            if free >= w:
                return []  # it fits somewhere: Ray is still placing it
            movable = sorted((x for x in here if x[2] < w and x[0] not in busy), key=lambda x: x[2])
            pick: list[tuple[str, str, int]] = []
            for x in movable:
                if free >= w:
                    break
                pick.append(x)
                free += x[2]
            if free >= w and (best is None or sum(x[2] for x in pick) < sum(x[2] for x in best)):
                best = pick
        if not best:
            return []
        for r, _, _ in best:
            self.registry.deregister(r)
        self.evict([(d, r) for r, d, _ in best])
        self.defrags.append({"t": round(self.now(), 3), "for": deployment, "stopped": [r for r, _, _ in best]})
        logger.warning("re-shape: %s does not fit on any node; stopped %s to make room", deployment,
                       [f"{d}/{r}" for r, d, _ in best])
        return [(d, r) for r, d, _ in best]


    def fixed(self, reason: str) -> None:
        """A shared-pool policy: run the configured replica counts, always (`roll` publishes them)."""
        self.counts = {d.name: d.replicas for d in self.cfg.deployments}
        self.replans.append({"t": round(self.now(), 3), "wall": time.time(), "reason": reason,
                             "counts": dict(self.counts)})
        self.roll()

    def pool_replica(self, deployment: str, node: int, avoid: str | None = None,
                     prefer: str | None = None) -> str | None:
        """The live replica of `deployment` a pool launch on `node` goes to: `prefer` if it
        qualifies, else the one with the fewest launches in flight, on `node` first; None while
        none has registered."""
        now = time.monotonic()
        shunned = {r for r, t in self.registry.shunned.items() if t > now}
        ok = [r for r, i in self.registry.replicas.items()
              if i.deployment == deployment and r != avoid and r not in shunned]
        if not ok:
            return None
        if prefer in ok:
            return prefer
        load = Counter(self.on_replica.values())
        return min(ok, key=lambda r: (self.registry.node_of(r) != node, load[r], r))

    def keep(self, counts: dict[str, int], reason: str) -> None:
        """Adopt counts published earlier (a restarted controller) until the policy's first plan."""
        self.counts = dict(counts)
        self.published = dict(counts)
        self.replans.append({"t": 0.0, "wall": time.time(), "reason": reason, "counts": dict(counts)})

    def deployment_for(self, stage: Stage, width: int) -> str:
        """The deployment that runs a launch of `stage` at `width` (the widest configured <= it)."""
        widths = self.cfg.widths(stage)
        if width not in widths:
            width = max([w for w in widths if w <= width] or [widths[0]])
        return DeploymentKey(stage, width).name

    # -- state and scheduling ------------------------------------------------------------------------
    def bindings(self) -> dict[str, str]:
        """Plan group id -> live replica id (empty while no replica has registered)."""
        if not self.registry.enabled:
            return {}
        return self.registry.bind([(g.id, self.deployment_for(g.stages[0], g.width), g.node)
                                   for g in self.plan.groups], time.monotonic())

    def nodes_alive(self, alive: dict[str, float]) -> list[str]:
        """Ray's live nodes are `alive` (node id -> GPUs): every registered node not among them
        is lost (its replicas leave the registry, its index is down for the policy); a live node
        with GPUs that the registry does not know takes a lost node's place (a node added back:
        the policy plans on it again, and Serve then starts replicas there). The replicas dropped."""
        dropped: list[str] = []
        for node_id in [n for n in self.registry.nodes if n not in alive]:
            gone = self.registry.node_lost(node_id)
            logger.warning("Ray node %s is dead: its %d replica(s) leave the registry", node_id[:12], len(gone))
            dropped += gone
        for node_id, gpus in sorted(alive.items()):
            if not self.down:
                break
            if gpus >= self.cluster.gpus_per_node and node_id not in self.registry.nodes:
                index = self.registry.node_seen(node_id)
                logger.warning("Ray node %s joined: it takes the place of lost node %d", node_id[:12], index)
        return dropped

    @property
    def down(self) -> frozenset[int]:
        """Plan nodes lost and not yet replaced by a new node."""
        return frozenset(i for i in self.registry.lost if i < self.cluster.nodes)

    def state(self) -> ClusterState:
        busy = {(l.node, g) for l, _ in self.inflight.values() for g in l.gpus}
        down = self.down
        free = {n: frozenset(g for g in range(self.cluster.gpus_per_node) if (n, g) not in busy)
                for n in range(self.cluster.nodes) if n not in down}
        bound = self.bindings()
        # a group is ready when bound to a live replica, wherever Ray put it: its plan node is a
        # preference (a group of a lost node bound to a replica elsewhere still runs work)
        ready = frozenset(g.id for g in self.plan.groups
                          if (not self.registry.enabled or g.id in bound)
                          and not any((g.node, x) in busy for x in g.gpus))
        return ClusterState(self.now(), free, ready, down)

    def schedule(self) -> None:
        """Run the policy until it launches nothing more. A policy that raises is logged and
        counted, and tried again on the next event or tick: the controller itself stays up."""
        for _ in range(100):
            t = time.perf_counter()
            try:
                out = self.policy.schedule(self.state())
            except Exception:
                logger.exception("policy.schedule failed; retrying on the next event or tick")
                if self.metrics is not None:
                    self.metrics.policy_error()
                return
            if out.new_plan is not None:
                if self.metrics is not None:
                    self.metrics.solver_time(time.perf_counter() - t)
                self.publish(out.new_plan, out.replan_reason or "policy re-plan")
            if not out.launches:
                return
            for launch in out.launches:
                self._start(launch)

    def _start(self, launch: Launch) -> None:
        launch_id = next(self._ids)
        self.inflight[launch_id] = (launch, set(launch.request_ids))
        self.launch_t[launch_id] = time.monotonic()
        deployment = self.deployment_for(launch.stages[0], launch.width)
        if launch.group_id:
            replica = self.bindings().get(launch.group_id)
        elif self.registry.enabled:  # the pool: the replica of that width on that node
            replica = self.pool_replica(deployment, launch.node)
        else:
            replica = None
        if replica is not None and not launch.group_id:
            self.on_replica[launch_id] = replica
        for rid in launch.request_ids:
            grant = Grant.for_launch(rid, launch, launch_id, deployment, replica)
            key = (rid, grant.stage)
            if rid in self.ended:  # the request already ended (failed, cancelled): nobody will run it.
                self.done(grant)  # The policy, which has no cancel, still launches its later stages
                continue
            self.on_grant(grant)
            if key in self.waiters:
                fut = self.waiters.pop(key)
                if not fut.done():
                    fut.set_result(grant)
            else:
                self.granted[key] = grant

    def done(self, grant: Grant) -> float | None:
        """The request no longer holds its launch; returns the launch's age if it was in flight."""
        entry = self.inflight.get(grant.batch_id) if grant.batch_id is not None else None
        if entry is None:
            return None
        launch, remaining = entry
        took = time.monotonic() - self.launch_t.get(grant.batch_id, time.monotonic())
        remaining.discard(grant.request_id)
        if not remaining:
            del self.inflight[grant.batch_id]
            self.launch_t.pop(grant.batch_id, None)
            self.on_replica.pop(grant.batch_id, None)
            self.policy.on_launch_done(launch, self.now())
        return took

    def take(self, rid: str, stage: Stage) -> Grant | None:
        return self.granted.pop((rid, stage), None)

    def wait(self, rid: str, stage: Stage) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self.waiters[(rid, stage)] = fut
        return fut

    def release(self, rid: str, ended_unfinished: bool) -> None:
        """`rid` ended: drop its grants, free what it holds; void later launches if unfinished."""
        if ended_unfinished:
            self.ended[rid] = None
            while len(self.ended) > MAX_ENDED:
                self.ended.popitem(last=False)
        for key in [k for k in self.granted if k[0] == rid]:
            del self.granted[key]
        for key in [k for k in self.waiters if k[0] == rid]:
            fut = self.waiters.pop(key)
            if not fut.done():
                fut.cancel()
        for launch_id, (launch, remaining) in list(self.inflight.items()):
            if rid in remaining:
                self.done(Grant.for_launch(rid, launch, launch_id, "", None))

    def regrant(self, grant: Grant, here: str | None = None) -> Grant | None:
        """The same launch on another live replica of its deployment (the granted one is gone)."""
        if grant.batch_id not in self.inflight:
            return None
        node = grant.node if grant.node is not None else 0
        if grant.group:
            replica = self.registry.rebind(grant.group, grant.deployment, node, grant.replica_id,
                                           time.monotonic(), prefer=here)
        else:  # a pool launch: another replica of that width, the one Serve routed to if it can
            if grant.replica_id is not None:
                self.registry.shun(grant.replica_id, time.monotonic())
            replica = self.pool_replica(grant.deployment, node, avoid=grant.replica_id, prefer=here)
            if replica is not None:
                self.on_replica[grant.batch_id] = replica
        if replica is None:
            return None
        return dataclasses.replace(grant, replica_id=replica)

    def queues(self) -> tuple[dict[str, int], dict[str, int]]:
        """(granted but not done per deployment, waiting for a launch per stage)."""
        per_dep = {d.name: 0 for d in self.cfg.deployments}
        for launch, remaining in self.inflight.values():
            name = self.deployment_for(launch.stages[0], launch.width)
            per_dep[name] = per_dep.get(name, 0) + len(remaining)
        waiting = {s: 0 for s in STAGES}
        for (_, stage) in self.waiters:
            waiting[stage] = waiting.get(stage, 0) + 1
        return per_dep, waiting
