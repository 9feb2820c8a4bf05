"""Placing replica groups on nodes: from counts per deployment to groups on GPU blocks.

A `Deployment` is a kind of replica group (model, stage, width); the placement solver decides
how many of each, `pack` decides where. Widths divide each other (1, 2, 4, 8), so placing the
widest groups first on aligned blocks never fragments a node.

Re-plans: a group of the current plan that is still wanted keeps its node and GPUs, hence its
id (`{model}:{stage}-w{width}@n{node}g{first_gpu}`) — every group that moves is a replica
restart (seconds to minutes in a real cluster) and a drain of the one it replaces. So `pack`
works widest first; at each width it first keeps the current groups whose GPUs are still
free, then puts new groups on the free aligned block that displaces the fewest GPUs of
narrower groups the plan keeps (ties: the fullest node that fits, i.e. best fit). A narrower
current group that a new wide one displaced is placed again later like a new group.
"""
from __future__ import annotations

from dataclasses import dataclass

from trident_rs.policy.types import Cluster, DeploymentKey, PlacementPlan, ReplicaGroup, Stage


@dataclass(frozen=True, order=True)
class Deployment:
    """A kind of replica group: `width` GPUs running `stage` of `model`."""

    model: str
    stage: Stage
    width: int


def group_id(model: str, stage: str, width: int, node: int, first_gpu: int) -> str:
    return f"{model}:{DeploymentKey(stage, width).name}@n{node}g{first_gpu}"


def deployment_of(group: ReplicaGroup) -> Deployment:
    return Deployment(group.model, group.stages[0], group.width)


def plan_counts(plan: PlacementPlan) -> dict[Deployment, int]:
    """Replica groups per deployment in `plan` (single-stage groups only)."""
    out: dict[Deployment, int] = {}
    for g in plan.groups:
        if len(g.stages) == 1:
            d = deployment_of(g)
            out[d] = out.get(d, 0) + 1
    return out


def pack(cluster: Cluster, counts: dict[Deployment, int],
         current: PlacementPlan | None = None) -> tuple[list[ReplicaGroup], int]:
    """Groups for `counts` on nodes, keeping `current`'s groups where still wanted.

    Returns the groups and how many did not fit (0 whenever the counts satisfy the solver's
    packing limits and widths divide the node size).
    """
    G = cluster.gpus_per_node
    free = [[True] * G for _ in range(cluster.nodes)]
    n_free = [G] * cluster.nodes
    # GPUs of current groups still wanted and not yet placed: new groups avoid them
    soft = [[False] * G for _ in range(cluster.nodes)]
    wanted: dict[Deployment, list[ReplicaGroup]] = {}
    if current is not None:
        for g in sorted(current.groups, key=lambda g: g.id):
            d = deployment_of(g) if len(g.stages) == 1 else None
            if d is None or len(wanted.get(d, ())) >= counts.get(d, 0):
                continue
            if g.node >= cluster.nodes or g.node in cluster.down or any(i >= G for i in g.gpus):
                continue
            wanted.setdefault(d, []).append(g)
            for i in g.gpus:
                soft[g.node][i] = True
    buckets: list[set[int]] = [set() for _ in range(G + 1)]  # nodes by free GPU count
    buckets[G].update(cluster.up)
    buckets[0].update(cluster.down)
    for n in cluster.down:  # lost: nothing goes there
        free[n], n_free[n] = [False] * G, 0

    def take(node: int, gpus: tuple[int, ...]) -> None:
        buckets[n_free[node]].discard(node)
        for i in gpus:
            free[node][i] = False
            soft[node][i] = False
        n_free[node] -= len(gpus)
        buckets[n_free[node]].add(node)

    groups: list[ReplicaGroup] = []
    dropped = 0
    for width in sorted({d.width for d in counts}, reverse=True):
        deps = sorted(d for d, k in counts.items() if d.width == width and k > 0)
        need = dict.fromkeys(deps, 0)
        for d in deps:
            need[d] = counts[d]
            for g in wanted.get(d, ()):
                if all(free[g.node][i] for i in g.gpus):
                    take(g.node, g.gpus)
                    groups.append(g)
                    need[d] -= 1
                else:  # displaced by a wider new group: no longer reserves its GPUs
                    for i in g.gpus:
                        soft[g.node][i] = False
        for d in deps:
            for _ in range(need[d]):
                block = _best_block(free, soft, buckets, width, G)
                if block is None:
                    dropped += 1
                    continue
                node, gpus = block
                take(node, gpus)
                groups.append(ReplicaGroup(group_id(d.model, d.stage, d.width, node, gpus[0]), d.model,
                                           (d.stage,), d.width, node, gpus))
    return groups, dropped


def _best_block(free, soft, buckets, width: int, G: int) -> tuple[int, tuple[int, ...]] | None:
    """The free aligned block of `width` GPUs that overlaps the fewest reserved GPUs, on the
    fullest node that fits (best fit); if no aligned block is free, the lowest free GPUs of the
    fullest node with room (only when widths do not divide the node)."""
    best: tuple[int, int, tuple[int, ...]] | None = None  # (overlap, node, gpus)
    for k in range(width, G + 1):
        for node in sorted(buckets[k]):
            row, res = free[node], soft[node]
            for start in range(0, G - width + 1, width):
                if all(row[start:start + width]):
                    overlap = sum(res[start:start + width])
                    if best is None or overlap < best[0]:
                        best = (overlap, node, tuple(range(start, start + width)))
                        if overlap == 0:
                            return node, best[2]
    if best is not None:
        return best[1], best[2]
    for k in range(width, G + 1):
        if buckets[k]:
            node = min(buckets[k])
            return node, tuple([i for i, f in enumerate(free[node]) if f][:width])
    return None


__all__ = ["Deployment", "deployment_of", "group_id", "pack", "plan_counts"]
