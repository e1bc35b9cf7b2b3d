"""The autoscaler's pure decision (cluster/autoscale.py): one table row per reason, the room each
worker gets, and the static EPLB plan."""
import numpy as np
import pytest

from cluster.autoscale import Limits, decide, static, workers
from cluster.eplb import rebalance_experts, to_placement
from cluster.placement import Placement, Table, WorkerRef, round_robin

LAYERS = [1, 3]  # MoE layer ids (row i of the loads is layer LAYERS[i])
EXPERTS = 8
LIMITS = Limits(hot_threshold=1.2, min_gain=0.05, cooldown_s=30.0, extra_per_layer=4, max_copies=4)
EVEN = np.ones((2, EXPERTS))
SKEWED = np.where(np.arange(EXPERTS) == 0, 40.0, 1.0)[None].repeat(2, axis=0)  # expert 0 is hot in both layers


def _table(placement: Placement, retired: tuple[int, ...] = ()) -> Table:
    refs = tuple(WorkerRef(f"w{w}:1", node_id=f"node-{w % 2}", retired=w in retired)
                 for w in range(placement.num_workers))
    return Table(1, placement, refs)


ONE_EACH = _table(round_robin([(layer, e) for layer in LAYERS for e in range(EXPERTS)], 4))
# expert 0 of each layer has a copy on every worker: memory for nothing once traffic is even
HOT_COPIES = _table(Placement(tuple(tuple(sorted(set(ws) | {(1, 0), (3, 0)})) for ws in ONE_EACH.placement.workers)))


@pytest.mark.parametrize("loads,table,limits,since,reason", [
    (np.zeros((2, EXPERTS)), ONE_EACH, LIMITS, 1e9, "no_load"),
    (SKEWED, ONE_EACH, LIMITS, 10.0, "cooldown"),
    (EVEN, ONE_EACH, LIMITS, 1e9, "no_change"),  # balanced and one copy each: nothing to do
    (SKEWED, ONE_EACH, LIMITS, 1e9, "rebalance"),
    (SKEWED, ONE_EACH, Limits(**{**vars(LIMITS), "min_gain": 100.0}), 1e9, "small_gain"),
    (SKEWED, ONE_EACH, Limits(**{**vars(LIMITS), "hot_threshold": 100.0}), 1e9, "balanced"),  # no extra to free
    (EVEN, HOT_COPIES, LIMITS, 1e9, "retire"),  # traffic evened out: the extra copies go
])
def test_each_reason(loads, table, limits, since, reason):
    d = decide(loads, table=table, limits=limits, moe_layers=LAYERS, expert_bytes=0, since_change_s=since)
    assert d.reason == reason
    assert (d.placement is not None) == (reason in ("rebalance", "retire"))


def test_a_rebalance_splits_the_hot_expert_and_lowers_max_over_mean():
    d = decide(SKEWED, table=ONE_EACH, limits=LIMITS, moe_layers=LAYERS, expert_bytes=0, since_change_s=1e9)
    assert d.after < d.before - LIMITS.min_gain
    assert len(d.placement.copies()[(1, 0)]) > 1 and len(d.placement.copies()[(3, 0)]) > 1
    d.placement.check_covers([(layer, e) for layer in LAYERS for e in range(EXPERTS)])


def test_a_retirement_keeps_one_copy_of_every_expert_where_it_was():
    d = decide(EVEN, table=HOT_COPIES, limits=LIMITS, moe_layers=LAYERS, expert_bytes=0, since_change_s=1e9)
    assert sum(map(len, d.placement.workers)) == 2 * EXPERTS
    assert all(set(new) <= set(old) for new, old in zip(d.placement.workers, HOT_COPIES.placement.workers))


def test_retired_workers_get_no_room_and_no_copies():
    table = _table(ONE_EACH.placement.with_worker(), retired=(4,))
    limits = Limits(**{**vars(LIMITS), "slots_per_worker": 9, "budget_bytes": 500})
    room = workers(table, limits)
    assert [w.retired for w in room] == [False] * 4 + [True]
    assert {(w.slots, w.budget_bytes) for w in room} == {(9, 500)} and room[1].node == "node-1"
    d = decide(SKEWED, table=table, limits=limits, moe_layers=LAYERS, expert_bytes=100, since_change_s=1e9)
    assert d.reason == "rebalance" and d.placement.workers[4] == ()
    assert all(len(ws) * 100 <= 500 for ws in d.placement.workers)  # the byte budget holds


def test_static_plans_with_eplb_over_the_active_workers():
    table = _table(ONE_EACH.placement.with_worker(), retired=(2,))
    d = static(SKEWED, LAYERS, table=table, moe_layers=LAYERS, extra_per_layer=4)
    placed = to_placement(rebalance_experts(loads=SKEWED, extra_per_layer=4, num_workers=4), LAYERS)
    assert d.reason == "static" and d.placement.workers[2] == ()
    assert [d.placement.workers[w] for w in (0, 1, 3, 4)] == list(placed.workers)
    assert d.after < d.before


def test_static_refuses_a_profile_of_other_layers():
    with pytest.raises(ValueError, match=r"profile layers \[0, 1\] are not this model's MoE layers \[1, 3\]"):
        static(SKEWED, [0, 1], table=ONE_EACH, moe_layers=LAYERS, extra_per_layer=4)


TWO_EACH = _table(round_robin([(layer, e) for layer in LAYERS for e in range(EXPERTS)], 4, 2))
TWO_AND_HOT = _table(Placement(tuple(tuple(sorted(set(ws) | {(1, 0), (3, 0)})) for ws in TWO_EACH.placement.workers)))


@pytest.mark.parametrize("loads,table,reason", [(EVEN, TWO_EACH, "no_change"), (SKEWED, TWO_EACH, "rebalance"),
                                                (EVEN, TWO_AND_HOT, "retire")])
def test_expert_copies_are_a_floor_the_planner_never_retires_below(loads, table, reason):
    """With expert_copies 2 the online planner retired the redundancy as "extra copies" once traffic
    was even, and a killed worker then failed requests: min_copies keeps every expert on two workers."""
    limits = Limits(**{**vars(LIMITS), "min_copies": 2})
    d = decide(loads, table=table, limits=limits, moe_layers=LAYERS, expert_bytes=0, since_change_s=1e9)
    assert d.reason == reason
    placement = d.placement or table.placement
    copies = placement.copies()
    assert all(len(set(ws)) == len(ws) >= 2 for ws in copies.values())
    if reason == "retire":
        assert all(len(ws) == 2 for ws in copies.values())  # only the hot extras go
    if reason == "rebalance":
        assert len(copies[(1, 0)]) > 2 and d.after < d.before  # the hot expert's extras come beyond the floor
    one_floor = decide(loads, table=table, limits=LIMITS, moe_layers=LAYERS, expert_bytes=0, since_change_s=1e9)
    assert min(map(len, (one_floor.placement or table.placement).copies().values())) == 1  # what it did before


def test_the_floor_wins_over_max_copies_and_comes_back_when_a_worker_leaves():
    from cluster.rebalance import hand_back

    limits = Limits(**{**vars(LIMITS), "min_copies": 2, "max_copies": 1})
    d = decide(EVEN, table=TWO_EACH, limits=limits, moe_layers=LAYERS, expert_bytes=0, since_change_s=1e9)
    assert d.reason == "no_change"  # max_copies 1 retired the redundancy down to one copy
    left = hand_back(TWO_EACH.placement, 3, [0, 1, 2, 3])  # a pool worker left: some experts hold one copy
    table = _table(left, retired=(3,))
    limits = Limits(**{**vars(LIMITS), "min_copies": 2})
    for loads, since in ((EVEN, 1e9), (np.zeros_like(EVEN), 1e9), (SKEWED, 0.0)):  # balanced, idle, cooling down
        d = decide(loads, table=table, limits=limits, moe_layers=LAYERS, expert_bytes=0, since_change_s=since)
        assert d.reason == "floor"
        assert all(len(ws) >= 2 and 3 not in ws for ws in d.placement.copies().values())
