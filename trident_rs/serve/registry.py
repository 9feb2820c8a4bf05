"""The registry of real stage replicas, and which plan group each one runs.

Every stage replica registers with the controller when it starts (Serve replica id, deployment,
Ray node id, GPU ids) and again every `HEARTBEAT_S` (the heartbeat); it deregisters when Serve
stops it. A replica not heard from for `EXPIRE_S` counts as stopped (its node died, or it cannot
reach the controller); if it is heard from again (a partition healed, a stalled process resumed),
it is taken back. A controller that itself did not run for `EXPIRE_S` (stopped, partitioned) gives
every replica a fresh interval before expiring any: it could not have heard them. A restarted
controller starts empty and is refilled by the next heartbeats, within `HEARTBEAT_S`.

Binding: the policy plans replica groups (deployment, node index, GPUs); Serve decides which
replicas run and Ray where they go. Each plan group is bound to one live replica of its
deployment, preferring a replica on the group's node; a binding lasts as long as both exist.
The policy adopts where Ray placed the replicas: Serve cannot put a given replica on a given
node, so the plan's node of a group is a preference, and `status` shows where each group runs.
A width-k group never spans nodes (its replica is a STRICT_PACK placement group).

Node indices: the plan's nodes are indices; the registry gives each Ray node an index when its
first replica registers. A node Ray reports dead (`node_lost`) gives its index up: the policy
sees that index as down, and the next new node to register takes it (a node added back fills
the place of the one lost; so does a new node Ray reports with GPUs before any replica runs
there, since a policy planning around a lost node would never start one there); a node that
registered beyond the plan's `plan_nodes` before the loss was noticed moves into the place at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

HEARTBEAT_S = 2.0
EXPIRE_S = 3 * HEARTBEAT_S
FIRST_REGISTER_S = 1.0  # a replica registers this long after its constructor: Serve's routers learn
# of a new replica shortly after it is RUNNING, and a grant must not name one they cannot reach yet
SHUN_S = 10.0  # a replica that Serve no longer routes to (a call granted to it went elsewhere) gets
# no new group for this long: Serve is stopping it, and it deregisters only after draining


@dataclass
class ReplicaInfo:
    replica_id: str
    deployment: str
    node_id: str
    gpu_ids: tuple[str, ...] = ()
    last_seen: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"replica_id": self.replica_id, "deployment": self.deployment, "node_id": self.node_id,
                "gpu_ids": list(self.gpu_ids)}


@dataclass
class ReplicaRegistry:
    replicas: dict[str, ReplicaInfo] = field(default_factory=dict)
    nodes: dict[str, int] = field(default_factory=dict)  # Ray node id -> node index, in order first seen
    bound: dict[str, str] = field(default_factory=dict)  # plan group id -> replica id
    gone: set[str] = field(default_factory=set)  # replicas deregistered (never rebound)
    expired: set[str] = field(default_factory=set)  # replicas not heard from in time (taken back if heard again)
    last_expire: float | None = None  # when `expire` last ran
    shunned: dict[str, float] = field(default_factory=dict)  # replica id -> until (monotonic)
    lost: set[int] = field(default_factory=set)  # indices of nodes lost, not yet taken by a new node
    plan_nodes: int = 0  # the plan's node count (indices from it on are extra nodes); 0: no limit

    @property
    def enabled(self) -> bool:
        """Whether any replica ever registered (else grants name no replica: tests, old apps)."""
        return bool(self.replicas or self.gone or self.expired)

    def register(self, replica_id: str, deployment: str, node_id: str, gpu_ids: Any, now: float) -> bool:
        """Add or refresh a replica; True if it is new."""
        if replica_id in self.gone:
            return False
        self.expired.discard(replica_id)  # heard from again: back
        self.node_seen(node_id)
        info = self.replicas.get(replica_id)
        if info is None:
            self.replicas[replica_id] = ReplicaInfo(replica_id, deployment, node_id,
                                                    tuple(str(g) for g in gpu_ids or ()), now)
            return True
        info.last_seen = now
        return False

    def deregister(self, replica_id: str) -> bool:
        self.gone.add(replica_id)
        for gid in [g for g, r in self.bound.items() if r == replica_id]:
            del self.bound[gid]
        return self.replicas.pop(replica_id, None) is not None

    def expire(self, now: float, after_s: float = EXPIRE_S) -> list[str]:
        if self.last_expire is not None and now - self.last_expire > after_s:  # we were not running
            for info in self.replicas.values():
                info.last_seen = max(info.last_seen, now)
        self.last_expire = now
        old = [r for r, i in self.replicas.items() if now - i.last_seen > after_s]
        for r in old:
            self.replicas.pop(r, None)
            for gid in [g for g, b in self.bound.items() if b == r]:
                del self.bound[gid]
            self.expired.add(r)
        if len(self.expired) > 10_000:  # replicas that never came back (their node died)
            self.expired = set(sorted(self.expired)[-5_000:])
        return old

    def node_seen(self, node_id: str) -> int:
        """The index of `node_id`; a new node takes the place of a lost one first."""
        if node_id not in self.nodes:
            index = min(self.lost) if self.lost else len(self.nodes)
            self.lost.discard(index)
            self.nodes[node_id] = index
        return self.nodes[node_id]

    def node_lost(self, node_id: str) -> list[str]:
        """Ray reports `node_id` dead: drop its replicas (as expired) and free its index. The
        replicas dropped."""
        index = self.nodes.pop(node_id, None)
        if index is None:
            return []
        extra = sorted((i, n) for n, i in self.nodes.items() if self.plan_nodes and i >= self.plan_nodes)
        if extra and index < self.plan_nodes:  # a node that joined before this loss was seen replaces it
            self.nodes[extra[0][1]] = index
            index = extra[0][0]
        self.lost.add(index)
        dropped = [r for r, i in self.replicas.items() if i.node_id == node_id]
        for r in dropped:
            del self.replicas[r]
            self.expired.add(r)
        self.bound = {g: r for g, r in self.bound.items() if r not in dropped}
        return dropped

    def live_counts(self) -> dict[str, int]:
        """Registered (running) replicas per deployment."""
        out: dict[str, int] = {}
        for info in self.replicas.values():
            out[info.deployment] = out.get(info.deployment, 0) + 1
        return out

    def live(self, replica_id: str | None) -> bool:
        return replica_id is not None and replica_id in self.replicas

    def node_of(self, replica_id: str) -> int | None:
        info = self.replicas.get(replica_id)
        return None if info is None else self.nodes[info.node_id]

    def shun(self, replica_id: str, now: float, for_s: float = SHUN_S) -> None:
        """Bind no group to `replica_id` for `for_s` (Serve no longer routes to it)."""
        self.shunned[replica_id] = now + for_s
        for gid in [g for g, r in self.bound.items() if r == replica_id]:
            del self.bound[gid]

    def bind(self, groups: list[tuple[str, str, int]], now: float | None = None) -> dict[str, str]:
        """Bind plan groups, given as (group id, deployment, node index), to live replicas.
        Existing bindings are kept; a group with no free replica of its deployment stays unbound."""
        if self.shunned and now is not None:
            self.shunned = {r: t for r, t in self.shunned.items() if t > now}
        wanted = {gid for gid, _, _ in groups}
        self.bound = {g: r for g, r in self.bound.items() if g in wanted and r in self.replicas}
        taken = set(self.bound.values()) | set(self.shunned)
        for gid, deployment, node in sorted(groups, key=lambda g: g[0]):
            if gid in self.bound:
                continue
            free = [r for r, i in self.replicas.items() if i.deployment == deployment and r not in taken]
            if not free:
                continue
            free.sort(key=lambda r: (self.nodes[self.replicas[r].node_id] != node, r))
            self.bound[gid] = free[0]
            taken.add(free[0])
        return self.bound

    def rebind(self, gid: str, deployment: str, node: int, avoid: str | None, now: float,
               prefer: str | None = None) -> str | None:
        """Bind `gid` to another live replica of `deployment` (Serve no longer routes to `avoid`),
        `prefer` first (the replica Serve did route the call to); None if there is none."""
        if avoid is not None:
            self.shun(avoid, now)
        self.bound.pop(gid, None)
        ok = lambda r: (r in self.replicas and self.replicas[r].deployment == deployment  # noqa: E731
                        and r != avoid and r not in self.shunned)
        if prefer is not None and ok(prefer) and prefer not in self.bound.values():
            self.bound[gid] = prefer
            return prefer
        self.bind([(gid, deployment, node)])
        if gid in self.bound:
            return self.bound[gid]
        spare = sorted(r for r in self.replicas if ok(r))
        if prefer is not None and ok(prefer):
            return prefer
        return spare[0] if spare else None  # shared with another group: better than never running

    def snapshot(self) -> dict[str, Any]:
        by_replica = {r: g for g, r in self.bound.items()}
        return {"nodes": {n: i for n, i in self.nodes.items()},
                "replicas": [dict(i.to_dict(), node=self.nodes[i.node_id], group=by_replica.get(r))
                             for r, i in sorted(self.replicas.items())]}
