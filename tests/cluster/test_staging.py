"""Moving copies in bounded chunks (cluster/staging.py): every intermediate table serves every expert."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.placement import Placement, round_robin
from cluster.rebalance import Worker, plan
from cluster.staging import changes, stage_moves


def random_placement(rng, layers: int, experts: int, workers: int) -> Placement:
    slots: list[list] = [[] for _ in range(workers)]
    for layer in range(layers):
        for e in range(experts):
            for w in rng.choice(workers, size=rng.integers(1, workers + 1), replace=False):
                slots[w].append((layer, e))
    return Placement(tuple(tuple(sorted(s)) for s in slots))


def held(p: Placement) -> set:
    return {(w, s) for w, slots in enumerate(p.workers) for s in slots}


def check_stages(old: Placement, new: Placement, tables: list[Placement], per_stage: int | None, by_layer: bool):
    experts = set(old.copies())
    assert held(tables[-1]) == held(new)
    for before, after in zip([old] + tables, tables):
        assert set(after.copies()) == experts  # every table serves every expert
        adds, drops = held(after) - held(before), held(before) - held(after)
        assert per_stage is None or len(adds) <= per_stage
        assert not by_layer or len({slot[0] for _, slot in adds}) <= 1
        for _, slot in drops:  # an expert's copy goes only once all its new copies are in
            assert {w for w, s in held(new) if s == slot} <= {w for w, s in held(after) if s == slot}
        assert not adds & held(old) - held(new) and not drops & held(new)  # no copy comes and goes


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 10_000), layers=st.integers(1, 3), experts=st.integers(1, 6), workers=st.integers(1, 5),
       per_stage=st.none() | st.integers(1, 4), by_layer=st.booleans())
def test_every_stage_covers_every_expert_and_ends_at_the_new_table(seed, layers, experts, workers, per_stage,
                                                                  by_layer):
    rng = np.random.default_rng(seed)
    old, new = (random_placement(rng, layers, experts, workers) for _ in range(2))
    tables = stage_moves(old=old, new=new, max_copies=per_stage, by_layer=by_layer)
    if held(old) == held(new):
        assert tables == []
        return
    check_stages(old, new, tables, per_stage, by_layer)


def test_a_rebalance_moves_in_chunks_of_bytes_with_retirements_first():
    loads = np.array([[60.0, 10, 10, 10, 5, 5], [5, 5, 10, 10, 10, 60]])
    old = round_robin([(layer, e) for layer in (0, 1) for e in range(6)], 3, copies=2)
    new = plan(loads, moe_layers=[0, 1], workers=[Worker()] * 3, extra_per_layer=3, current=old).placement
    tables = stage_moves(old=old, new=new, max_bytes=250, expert_bytes=100)  # 2 copies per stage
    check_stages(old, new, tables, 2, False)
    adds, drops = changes(old, tables[0])
    assert not any(adds) and any(drops)  # copies that only go away leave before anything loads
    assert len(tables) == 1 + -(-sum(map(len, changes(old, new)[0])) // 2)


def test_staging_a_worker_that_joins_and_one_that_leaves():
    old = Placement((((0, 0), (0, 1)), ((0, 1),), ((0, 2),)))
    new = Placement((((0, 0),), ((0, 1), (0, 2)), (), ((0, 0), (0, 2))))
    tables = stage_moves(old=old, new=new, max_copies=1)
    check_stages(old, new, tables, 1, False)
    assert tables[-1] == new and len(tables) == 4  # freeing (0, 1) from worker 0, then one copy per stage
    assert changes(old, new) == ([[], [(0, 2)], [], [(0, 0), (0, 2)]], [[(0, 1)], [], [(0, 2)], []])


def test_nothing_to_move_and_bad_limits():
    p = round_robin([(0, e) for e in range(4)], 2)
    assert stage_moves(old=p, new=p, max_copies=1) == []
    with pytest.raises(ValueError, match="load one copy"):
        stage_moves(old=p, new=p, max_bytes=10, expert_bytes=100)
    with pytest.raises(ValueError, match="max_bytes needs expert_bytes"):
        stage_moves(old=p, new=p, max_bytes=10)
    with pytest.raises(ValueError, match="without a copy"):
        stage_moves(old=p, new=Placement((((0, 0), (0, 1)), ((0, 2),))))
