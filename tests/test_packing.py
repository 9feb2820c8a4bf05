"""Packing replica groups on nodes: never over-commits, keeps the current plan's groups in place."""
from hypothesis import given, settings, strategies as st

from trident_rs.policy.packing import Deployment, pack, plan_counts
from trident_rs.policy.types import Cluster, PlacementPlan

DEPS = [Deployment("img", "encode", 1), Deployment("img", "decode", 1), Deployment("img", "diffuse", 1),
        Deployment("img", "diffuse", 2), Deployment("img", "diffuse", 4), Deployment("img", "diffuse", 8),
        Deployment("vid", "diffuse", 4)]


def _fitting_counts(draw_counts: dict[Deployment, int], cluster: Cluster) -> dict[Deployment, int]:
    """`draw_counts` trimmed (widest first) until it meets the solver's packing limits."""
    counts, used = {}, 0
    for d in sorted(draw_counts, key=lambda d: -d.width):
        k = min(draw_counts[d], (cluster.total_gpus - used) // d.width)
        if k > 0:
            counts[d] = k
            used += k * d.width
    return counts


counts_st = st.dictionaries(st.sampled_from(DEPS), st.integers(0, 12), min_size=1)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), counts_st, counts_st)
def test_pack_meets_counts_exactly_and_never_over_commits(nodes, before, after):
    cluster = Cluster(nodes, 8)
    first, dropped = pack(cluster, _fitting_counts(before, cluster))
    assert dropped == 0
    current = PlacementPlan(tuple(first))
    current.check(cluster)
    want = _fitting_counts(after, cluster)
    groups, dropped = pack(cluster, want, current)
    plan = PlacementPlan(tuple(groups))
    plan.check(cluster)  # no GPU twice, all on real nodes
    assert dropped == 0 and plan_counts(plan) == want
    assert all(len(g.gpus) == g.width and g.gpus[0] % g.width == 0 for g in groups)  # aligned blocks
    # unchanged counts: every group stays where it is (no restarts)
    same, _ = pack(cluster, plan_counts(current), current)
    assert {g.id for g in same} == {g.id for g in current.groups}


def test_a_new_wide_group_displaces_few_narrow_ones():
    """Adding a width-4 group to a plan of width-1 groups that leave no aligned 4-block free
    moves only the two groups in the block it takes; repacking from scratch (what `pack` did
    when the current places left no room) moved four of the twelve."""
    cluster = Cluster(2, 8)
    w1, w4 = Deployment("img", "diffuse", 1), Deployment("img", "diffuse", 4)
    groups, _ = pack(cluster, {w1: 16})
    current = PlacementPlan(tuple(g for g in groups if g.gpus[0] not in (6, 7)))  # 12 groups, GPUs 0-5
    assert len(current.groups) == 12
    new, dropped = pack(cluster, {w4: 1, w1: 12}, current)
    assert dropped == 0
    kept = {g.id for g in new} & {g.id for g in current.groups}
    assert len(kept) == 10
