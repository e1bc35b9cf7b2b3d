"""Placement algorithms: table-driven cases and a production-scale simulation."""
import time

import numpy as np
import pytest

from cluster.placement import Placement, round_robin
from cluster.rebalance import Worker, hand_back, imbalance, plan, replicate


@pytest.mark.parametrize("loads,extra,expected", [
    ([10, 1, 1, 1], 0, [1, 1, 1, 1]),
    ([10, 1, 1, 1], 1, [2, 1, 1, 1]),
    ([10, 1, 1, 1], 3, [4, 1, 1, 1]),
    ([8, 4, 1, 1], 3, [3, 2, 1, 1]),
    ([0, 0, 0, 0], 2, [2, 2, 1, 1]),  # ties: lowest expert id first
])
def test_replicate_gives_copies_to_the_highest_load_per_copy(loads, extra, expected):
    assert replicate(np.array(loads, dtype=float), extra).tolist() == expected


def test_hot_expert_is_split_and_balanced():
    loads = np.array([[60.0, 10, 10, 10, 5, 5]])  # one layer, expert 0 is hot
    result = plan(loads, moe_layers=[0], workers=[Worker()] * 3, extra_per_layer=3)
    copies = result.placement.copies()
    assert len(copies[(0, 0)]) >= 2 and len(set(copies[(0, 0)])) == len(copies[(0, 0)])
    assert result.max_over_mean <= 1.1
    assert imbalance(loads, [0], result.placement) == pytest.approx(result.max_over_mean)
    before = imbalance(loads, [0], round_robin([(0, e) for e in range(6)], 3))
    assert before > 1.5


def test_every_slot_keeps_a_copy_and_capacity_is_respected():
    rng = np.random.default_rng(0)
    loads = rng.random((3, 16))
    result = plan(loads, moe_layers=[0, 1, 2], workers=[Worker()] * 4, extra_per_layer=4)
    result.placement.check_covers([(layer, e) for layer in range(3) for e in range(16)])
    for slots in result.placement.workers:
        assert all(sum(1 for lyr, _ in slots if lyr == layer) <= 5 for layer in range(3))


def test_replanning_the_same_loads_moves_nothing():
    rng = np.random.default_rng(1)
    loads = rng.zipf(1.5, size=(4, 32)).astype(float)
    workers = [Worker()] * 8
    first = plan(loads, moe_layers=list(range(4)), workers=workers, extra_per_layer=8)
    again = plan(loads, moe_layers=list(range(4)), workers=workers, extra_per_layer=8, current=first.placement)
    assert again.moves == 0 and again.placement == first.placement and not again.changed


def test_hierarchical_balances_nearly_as_well_as_global():
    rng = np.random.default_rng(2)
    loads = np.stack([rng.permutation(1.0 / np.arange(1, 65)) for _ in range(2)])
    workers = [Worker(f"node-{i // 4}") for i in range(16)]
    hier = plan(loads, moe_layers=[0, 1], workers=workers, extra_per_layer=16, hierarchical=True)
    flat = plan(loads, moe_layers=[0, 1], workers=workers, extra_per_layer=16)
    assert hier.max_over_mean <= 1.1 * flat.max_over_mean
    assert hier.max_over_mean < imbalance(loads, [0, 1], round_robin([(l, e) for l in (0, 1) for e in range(64)], 16))


def test_production_scale_simulation():
    """58 MoE layers x 256 experts, 8 nodes x 8 workers, 32 extra slots per layer, Zipf loads."""
    rng = np.random.default_rng(0)
    layers, experts = 58, 256
    loads = np.stack([rng.permutation(1.0 / np.arange(1, experts + 1) ** 0.8) for _ in range(layers)]) * 1e5
    workers = [Worker(f"node-{i // 8}") for i in range(64)]
    baseline = round_robin([(layer, e) for layer in range(layers) for e in range(experts)], 64)
    before = imbalance(loads, list(range(layers)), baseline)
    t0 = time.perf_counter()
    result = plan(loads, moe_layers=list(range(layers)), workers=workers, extra_per_layer=32)
    seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    hier = plan(loads, moe_layers=list(range(layers)), workers=workers, extra_per_layer=32, hierarchical=True)
    hier_seconds = time.perf_counter() - t0
    print(f"max/mean worker load: round-robin {before:.2f} -> global {result.max_over_mean:.3f} "
          f"({seconds:.2f} s), hierarchical {hier.max_over_mean:.3f} ({hier_seconds:.2f} s)")
    assert before > 1.5
    assert result.max_over_mean <= 1.05
    assert hier.max_over_mean <= 1.15


def test_round_robin_copies_land_on_different_workers():
    slots = [(layer, e) for layer in (0, 1) for e in range(4)]
    p = round_robin(slots, 3, copies=2)
    copies = p.copies()
    assert all(len(set(ws)) == 2 for ws in copies.values()) and set(copies) == set(slots)
    assert copies[(0, 2)] == (0, 2)  # copy c of expert e on worker (e + c) % num_workers
    with pytest.raises(ValueError, match="copies must be between 1 and num_workers"):
        round_robin(slots, 2, copies=3)


def test_slot_capacity_and_memory_budget_are_respected():
    loads = np.array([[40.0, 10, 5, 5, 5, 5, 5, 5]])
    workers = [Worker(layer_slots=2), Worker(layer_slots=2), Worker(layer_slots=4), Worker(layer_slots=4)]
    p = plan(loads, moe_layers=[0], workers=workers, extra_per_layer=8)  # room: 8 experts + at most 4 extra
    assert all(len(s) <= w.layer_slots for s, w in zip(p.placement.workers, workers))
    assert p.max_over_mean == pytest.approx(1.0)  # one extra copy of expert 0 is enough: 20 per worker
    assert sum(map(len, p.placement.workers)) == 9  # the 3 more that fit would not lower max/mean
    hot = plan(np.array([[70.0, 2, 2, 2, 2, 2, 2, 2]]), moe_layers=[0], workers=workers, extra_per_layer=8)
    assert len(hot.placement.copies()[(0, 0)]) == 4  # one per worker: the most that fit
    assert all(len(s) <= w.layer_slots for s, w in zip(hot.placement.workers, workers))
    with pytest.raises(ValueError, match="at most 6 expert copies per layer .* each layer has 8 experts"):
        plan(loads, moe_layers=[0], workers=[Worker(layer_slots=3)] * 2, extra_per_layer=0)


def test_co_activation_co_locates_experts_chosen_together():
    loads = np.ones((1, 4))
    coact = np.zeros((1, 4, 4))
    coact[0, 0, 1] = coact[0, 2, 3] = 100  # tokens pick (0, 1) together and (2, 3) together
    plain = plan(loads, moe_layers=[0], workers=[Worker()] * 2, extra_per_layer=0)
    paired = plan(loads, moe_layers=[0], workers=[Worker()] * 2, extra_per_layer=0, coactivation=coact)
    assert sorted(plain.placement.workers) == [((0, 0), (0, 2)), ((0, 1), (0, 3))]
    assert sorted(paired.placement.workers) == [((0, 0), (0, 1)), ((0, 2), (0, 3))]
    assert paired.max_over_mean == plain.max_over_mean == 1.0  # balance is not given up for it


def test_a_leaving_worker_hands_back_the_copies_only_it_held():
    p = Placement((((0, 0), (0, 1)), ((0, 1), (0, 2)), ((0, 0), (0, 3), (0, 4))))
    new = hand_back(p, 2, [0, 1, 2])
    assert new.workers[2] == ()
    assert set(new.copies()) == set(p.copies())  # every expert still has a copy
    assert sorted(new.workers[0] + new.workers[1]) == sorted(p.workers[0] + p.workers[1] + ((0, 3), (0, 4)))
    assert abs(len(new.workers[0]) - len(new.workers[1])) <= 1  # to the workers holding the fewest
    with pytest.raises(ValueError, match="last worker"):
        hand_back(Placement((((0, 0),),)), 0, [0])


@pytest.mark.parametrize("gone", [Worker(retired=True), Worker(layer_slots=0)])
def test_retired_workers_get_nothing_and_do_not_count(gone):
    loads = np.array([[8.0, 4, 2, 2]])
    workers = [Worker(), Worker(), gone]
    p = plan(loads, moe_layers=[0], workers=workers, extra_per_layer=2)
    assert p.placement.workers[2] == () and p.max_over_mean < 1.2


def test_even_loads_keep_no_extra_copies_and_retire_the_ones_held():
    loads = np.full((2, 8), 5.0)
    slots = [(layer, e) for layer in (0, 1) for e in range(8)]
    fresh = plan(loads, moe_layers=[0, 1], workers=[Worker()] * 4, extra_per_layer=4)
    assert sum(map(len, fresh.placement.workers)) == 16 and fresh.max_over_mean == 1.0
    doubled = round_robin(slots, 4, copies=2)  # every expert twice: what a skewed past left behind
    p = plan(loads, moe_layers=[0, 1], workers=[Worker()] * 4, extra_per_layer=16, current=doubled)
    assert p.changed and p.moves == 0 and p.retires == 16 and p.max_over_mean == 1.0
    assert all(set(s) <= set(old) for s, old in zip(p.placement.workers, doubled.workers))


def test_byte_budget_is_never_exceeded_and_extra_copies_go_where_they_help():
    loads = np.array([[100.0, 1, 1, 1], [1, 1, 1, 1]])  # layer 0 skewed, layer 1 even
    workers = [Worker(budget_bytes=500), Worker(budget_bytes=599)]  # 5 copies of 100 bytes each
    p = plan(loads, moe_layers=[0, 1], workers=workers, extra_per_layer=4, expert_bytes=100)
    assert p.worker_bytes == (500, 500)  # 8 experts + 2 extra copies, both of the hot expert's layer
    copies = p.placement.copies()
    assert copies[(0, 0)] in ((0, 1), (1, 0)) and all(len(ws) == 1 for s, ws in copies.items() if s[0] == 1)
    with pytest.raises(ValueError, match=r"at most 6 expert copies \(budget_bytes.* need 8"):
        plan(loads, moe_layers=[0, 1], workers=[Worker(budget_bytes=399), Worker(budget_bytes=300)], extra_per_layer=0,
             expert_bytes=100)
    with pytest.raises(ValueError, match="expert_bytes"):
        plan(loads, moe_layers=[0, 1], workers=workers, extra_per_layer=0)


def test_a_tight_slot_capacity_still_places_every_copy():
    """Every worker full and the last copies belong to an expert already on the workers with room:
    the old greedy raised 'not enough worker slots'; the packer now shifts another copy aside."""
    loads = np.array([[10.0, 9, 9, 9, 9, 1, 1]])  # 8 copies after one extra, 2 workers x 4 slots
    p = plan(loads, moe_layers=[0], workers=[Worker(slots=4), Worker(slots=4)], extra_per_layer=1, max_copies=2)
    assert [len(s) for s in p.placement.workers] == [4, 4]
    assert sorted(p.placement.copies()[(0, 0)]) == [0, 1]


def test_max_copies_one_and_retired_workers_limit_the_copies():
    loads = np.array([[50.0, 1, 1]])
    one = plan(loads, moe_layers=[0], workers=[Worker()] * 3, extra_per_layer=3, max_copies=1)
    assert sum(map(len, one.placement.workers)) == 3
    retired = plan(loads, moe_layers=[0], workers=[Worker(), Worker(slots=0), Worker(budget_bytes=0)],
                   extra_per_layer=3, max_copies=3, expert_bytes=10)
    assert retired.placement.workers[1:] == ((), ()) and retired.placement.copies()[(0, 0)] == (0,)


def test_the_floor_is_kept_for_every_layer_when_slots_hold_it_exactly():
    """Room for exactly two copies of every expert: the skewed layer planned first took the room for
    its extras, and the next layer fell to one copy each with slots left empty."""
    loads = np.array([[5, 1, 1, 1], [1, 1, 1, 1.0]])
    p = plan(loads, moe_layers=[0, 1], workers=[Worker(slots=4)] * 4, extra_per_layer=2, min_copies=2)
    assert sorted(len(ws) for ws in p.placement.copies().values()) == [2] * 8
    assert [len(w) for w in p.placement.workers] == [4] * 4


def test_a_layer_at_the_floor_of_one_is_kept_when_extras_would_give_every_expert_two():
    """min_copies 1 (the default) plans as before the floor existed: a current layer holding one copy of
    some expert is valid and kept when it balances as well (it was thrown out: 13 moves, not 7)."""
    loads = np.array([[3, 3, 3, 2, 3, 3, 2, 1], [1, 2, 1, 1, 2, 3, 3, 1.0]])
    current = Placement((((0, 0), (0, 1), (0, 2), (0, 6), (1, 0), (1, 3), (1, 5), (1, 7)),
                         ((0, 0), (0, 3), (0, 4), (0, 5), (1, 0), (1, 1), (1, 4), (1, 6)),
                         ((0, 2), (0, 4), (0, 5), (0, 6), (1, 0), (1, 1), (1, 4), (1, 6)),
                         ((0, 1), (0, 2), (0, 3), (0, 7), (1, 1), (1, 2), (1, 4), (1, 6))))
    p = plan(loads, moe_layers=[0, 1], workers=[Worker()] * 4, extra_per_layer=14, current=current)
    assert (p.moves, p.retires, round(p.max_over_mean, 4)) == (7, 4, 1.1)
