"""Expert tiers (issue 23): tier placement, the promote/demote decision and tier-weighted copy choice.

Invariants: every expert keeps a copy, no worker goes over its byte budget, a move between two
tier placements (staged: adds before retires) never leaves an expert without a copy, and
alternating load does not make copies thrash."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.copy_choice import NoLiveCopy
from cluster.placement import Placement
from cluster.staging import stage_moves
from cluster.tier_choice import choose_tiered
from cluster.tiers import (FAST, HOST, Hysteresis, TierWorker, decide, fast_of, fast_sets, layer_sets,
                           tier_placement, tier_slots, uniform_sets)

EB = 100  # bytes of one expert copy


def _workers(fast_copies: list[int], host_copies: list[int]) -> list[TierWorker]:
    return [TierWorker(FAST, c * EB) for c in fast_copies] + [TierWorker(HOST, c * EB) for c in host_copies]


def _check(placement: Placement, workers: list[TierWorker], n_layers: int, n_exp: int) -> None:
    placement.check_covers([(layer, e) for layer in range(n_layers) for e in range(n_exp)])
    for w, experts in enumerate(placement.workers):
        assert len(experts) * EB <= workers[w].budget_bytes, f"worker {w} over its budget"
        assert len(set(experts)) == len(experts)


@pytest.mark.parametrize("loads,slots,expected", [
    ([[9, 1, 5, 0]], 2, [{0, 2}]),
    ([[9, 1, 5, 0], [0, 0, 0, 8]], 2, [{0}, {3}]),  # the heaviest of all layers: each layer's heaviest
    ([[9, 1, 5, 0], [0, 0, 0, 8]], 0, [set(), set()]),
    ([[0, 0, 0], [0, 0, 0]], 3, [{0, 1}, {0}]),  # no load: round-robin over layers, low ids first
    ([[1, 2], [3, 4]], 9, [{0, 1}, {0, 1}]),  # more room than experts: all of them
])
def test_fast_sets_go_to_the_most_loaded_experts(loads, slots, expected):
    assert [set(s) for s in fast_sets(np.array(loads, float), slots)] == expected


def test_uniform_and_by_layer_splits():
    assert [set(s) for s in uniform_sets(2, 4, 4)] == [{0, 1}, {0, 1}]
    assert [set(s) for s in layer_sets(3, 4, 9)] == [set(), {0, 1, 2, 3}, {0, 1, 2, 3}]  # 2 whole layers
    assert [set(s) for s in layer_sets(3, 4, 3)] == [set(), set(), set()]


@pytest.mark.parametrize("fast_copies,host_copies,on_host", [
    ([2, 2], [8, 8], 16),  # host room for every expert: it keeps all of them
    ([2, 2], [6, 6], 12),  # room for the 12 without a fast copy only
    ([3], [7, 7], 14),  # the 13 without a fast copy + a host copy of the hottest fast one
])
def test_tier_placement_covers_every_expert_within_budgets(fast_copies, host_copies, on_host):
    loads = np.array([[9, 1, 5, 0, 3, 2, 7, 4], [1, 1, 1, 8, 1, 6, 1, 1]], float)
    workers = _workers(fast_copies, host_copies)
    fast = fast_sets(loads, tier_slots(workers, FAST, EB))
    placement = tier_placement(fast, [0, 1], 8, workers, EB, loads)
    _check(placement, workers, 2, 8)
    assert fast_of(placement, workers, [0, 1]) == fast
    host = {x for w, ex in enumerate(placement.workers) if workers[w].tier == HOST for x in ex}
    assert len(host) == on_host


def test_two_host_copies_on_different_host_workers():
    loads = np.array([[9, 1, 5, 0, 3, 2, 7, 4]], float)
    workers = _workers([2], [8, 8])
    placement = tier_placement(fast_sets(loads, 2), [0], 8, workers, EB, loads, host_copies=2)
    _check(placement, workers, 1, 8)
    copies = placement.copies()
    assert all(len([w for w in copies[(0, e)] if workers[w].tier == HOST]) == 2 for e in range(8))  # room for all
    with pytest.raises(ValueError, match="host tier has no room"):
        tier_placement(fast_sets(loads, 2), [0], 8, _workers([2], [8]), EB, loads, host_copies=2)


def test_tier_placement_refuses_a_host_tier_too_small():
    with pytest.raises(ValueError, match="host tier has no room"):
        tier_placement(fast_sets(np.ones((1, 8)), 2), [0], 8, _workers([2], [3]), EB)


def test_copies_stay_where_they_are():
    loads = np.array([[9, 1, 5, 0, 3, 2, 7, 4]], float)
    workers = _workers([2, 2], [8, 8])
    first = tier_placement(fast_sets(loads, 4), [0], 8, workers, EB, loads)
    again = tier_placement(fast_sets(loads, 4), [0], 8, workers, EB, loads[:, ::-1].copy(), current=first)
    assert again == first


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 3), st.integers(2, 8), st.integers(0, 2**16), st.integers(0, 6), st.booleans())
def test_no_decision_drops_the_last_copy(n_layers, n_exp, seed, fast_room, host_keeps_all):
    """A run of promotions and demotions on random loads: every placement covers every expert within
    budgets, and every stage of the staged move between two of them holds a copy of every expert."""
    rng = np.random.default_rng(seed)
    need = n_layers * n_exp
    host = [need, need] if host_keeps_all else [need // 2 + 1, need // 2 + 1]
    workers = _workers([fast_room, fast_room], host)
    slots = tier_slots(workers, FAST, EB)
    fast = uniform_sets(n_layers, n_exp, slots)
    placement = tier_placement(fast, list(range(n_layers)), n_exp, workers, EB)
    moved: dict = {}
    for step in range(6):
        loads = rng.zipf(1.5, (n_layers, n_exp)).astype(float)
        d = decide(loads, fast, slots, moved=moved, now=step, rule=Hysteresis(dwell=1))
        assert sum(len(s) for s in d.fast) <= slots
        moved.update({x: step for x in d.promoted + d.demoted})
        new = tier_placement(d.fast, list(range(n_layers)), n_exp, workers, EB, loads, current=placement)
        _check(new, workers, n_layers, n_exp)
        for table in stage_moves(old=placement, new=new, max_copies=1):
            table.check_covers([(layer, e) for layer in range(n_layers) for e in range(n_exp)])
        placement, fast = new, d.fast


def test_hot_expert_is_promoted_and_a_cold_one_demoted():
    fast = (frozenset({0, 1}),)
    d = decide(np.array([[5.0, 1, 0, 9]]), fast, 2)
    assert d.promoted == ((0, 3),) and d.demoted == ((0, 1),) and d.fast == (frozenset({0, 3}),)


@pytest.mark.parametrize("loads,margin,moves", [
    ([[5.0, 4.0, 4.5, 0]], 1.25, 0),  # 4.5 is not 1.25 × 4: the fast copy stays
    ([[5.0, 4.0, 5.1, 0]], 1.25, 1),
    ([[5.0, 4.0, 4.5, 0]], 1.0, 1),  # no margin: it moves
])
def test_margin(loads, margin, moves):
    d = decide(np.array(loads), (frozenset({0, 1}),), 2, rule=Hysteresis(margin=margin))
    assert len(d.promoted) == moves and len(d.demoted) == moves


def test_free_fast_room_is_filled_without_demotion():
    d = decide(np.array([[5.0, 0, 3, 1]]), (frozenset({0}),), 3)
    assert set(d.promoted) == {(0, 2), (0, 3)} and d.demoted == ()


@pytest.mark.parametrize("swing,dwell,most_moves", [
    (1.1, 3, 0),  # near-equal load swapping each window: within the margin, nothing moves
    (3.0, 3, 4),  # large swings: an expert moves at most once per dwell (12 windows / 3)
    (3.0, 1, 12),  # no dwell: it would move every window
])
def test_no_thrash_under_alternating_load(swing, dwell, most_moves):
    a, b = np.array([[swing, 1.0, 0.1]]), np.array([[1.0, swing, 0.1]])
    fast, moved, moves = (frozenset({0}),), {}, 0
    for step in range(12):
        d = decide(a if step % 2 else b, fast, 1, moved=moved, now=step, rule=Hysteresis(dwell=dwell))
        moved.update({x: step for x in d.promoted + d.demoted})
        moves += len(d.promoted)
        fast = d.fast
    assert moves <= most_moves
    if dwell == 1 and swing > 2:
        assert moves == most_moves  # the dwell is what holds it back


@pytest.mark.parametrize("counts,queue,expect", [
    ([4, 0], {}, {0: [(0, 0, 4)]}),  # fast copy first: 4 × 1 < 1 × 10
    ([12, 0], {}, {0: [(0, 0, 11)], 1: [(0, 11, 1)]}),  # the 11th row finishes first on the host (10 < 11)
    ([2, 0], {0: 20}, {1: [(0, 0, 2)]}),  # a long fast queue: the host copy finishes first
    ([0, 3], {}, {1: [(1, 0, 3)]}),  # only a host copy
])
def test_tier_weighted_copy_choice(counts, queue, expect):
    copies = {(0, 0): (0, 1), (0, 1): (1,)}
    assert choose_tiered(0, counts, copies, cost=[1.0, 10.0], down=set(), queue=queue) == expect


def test_tier_weighted_copy_choice_skips_down_workers_and_refuses_no_copy():
    copies = {(0, 0): (0, 1)}
    assert choose_tiered(0, [3], copies, cost=[1.0, 10.0], down={0}) == {1: [(0, 0, 3)]}
    with pytest.raises(NoLiveCopy):
        choose_tiered(0, [3], copies, cost=[1.0, 10.0], down={0, 1})


def test_tier_step_promotes_the_hot_expert_and_keeps_every_expert_covered():
    from cluster.tiers import TierLayout, tier_step

    layout = TierLayout(tuple(_workers([2], [8, 8])), EB)
    start = tier_placement(uniform_sets(1, 8, 2), [0], 8, list(layout.workers), EB)
    loads = np.array([[1.0, 1, 1, 1, 1, 9, 1, 8]])
    moved: dict = {}
    d, new = tier_step(loads, start, layout, [0], moved=moved, now=1)
    assert set(d.promoted) == {(0, 5), (0, 7)} and set(d.demoted) == {(0, 0), (0, 1)}
    assert set(new.workers[0]) == {(0, 5), (0, 7)} and moved == {x: 1 for x in d.promoted + d.demoted}
    _check(new, list(layout.workers), 1, 8)
    assert tier_step(loads, new, layout, [0], moved=moved, now=2) == (tier_step(loads, new, layout, [0], moved={},
                                                                                now=2)[0], None)  # settled


def _ema_loads(p: np.ndarray, steps: int, rows: int, window: int, seed: int) -> np.ndarray:
    """[L, E] EMA (alpha = 2 / (window + 1)) of per-step row counts drawn from popularity p [L, E]:
    what a router's load tracker reports."""
    rng, alpha = np.random.default_rng(seed), 2 / (window + 1)
    ema = np.full(p.shape, rows / p.shape[1])
    for _ in range(steps):
        ema = (1 - alpha) * ema + alpha * np.stack([rng.multinomial(rows, q) for q in p])
    return ema


@pytest.mark.parametrize("hot,cold,window,z,expected", [
    (1.4, 1.0, 20, 5.0, False),  # Qwen3-30B-A3B decode: ~1 row per expert and step; 40% apart is noise
    (4.0, 1.0, 20, 5.0, True),  # a hot expert: 4× is far beyond it
    (1.4, 1.0, 2000, 5.0, True),  # the same gap over 100× more steps is real
    (1.4, 1.0, None, 5.0, True),  # no window: loads taken as exact
    (1.0, 1.0, None, 0.0, False),
])
def test_beyond_noise(hot, cold, window, z, expected):
    from cluster.tiers import beyond_noise

    assert beyond_noise(hot, cold, window, z) is expected


def test_uniform_routing_makes_no_promotions():
    """Qwen3-30B-A3B's shape (8 MoE layers, 128 experts, top-8), 16 sequences decoding, uniform routing,
    10% on the fast tier: 40 decisions on the live load estimate swap nothing (without the noise test
    the margin alone lets through dozens of swaps on chance gaps)."""
    n_layers, n_exp, rows, window = 8, 128, 16 * 8, 20
    slots = round(0.1 * n_layers * n_exp)
    uniform = np.full((n_layers, n_exp), 1 / n_exp)
    swaps = {}
    for noise in (True, False):
        fast, moved, swaps[noise] = uniform_sets(n_layers, n_exp, slots), {}, 0
        for step in range(40):
            loads = _ema_loads(uniform, 20, rows, window, seed=step)
            d = decide(loads, fast, slots, moved=moved, now=step, window_steps=window if noise else None)
            moved.update({x: step for x in d.promoted + d.demoted})
            swaps[noise], fast = swaps[noise] + len(d.promoted), d.fast
    assert swaps[True] == 0
    assert swaps[False] > 40


def test_a_real_shift_is_followed_through_the_noise_test():
    """The same shape under Zipf 1 routing whose hot experts move (a new domain): the decision
    promotes the new hot experts at the full max_moves pace, and they end up on the fast tier."""
    n_layers, n_exp, rows, window = 8, 128, 16 * 8, 20
    slots = round(0.1 * n_layers * n_exp)
    rng = np.random.default_rng(0)
    zipf = 1 / np.arange(1, n_exp + 1)
    old, new = (np.stack([zipf[np.argsort(rng.permutation(n_exp))] / zipf.sum() for _ in range(n_layers)])
                for _ in range(2))
    fast = fast_sets(old, slots)
    moved, promoted = {}, []
    for step in range(30):
        loads = _ema_loads(new, 20, rows, window, seed=step)
        d = decide(loads, fast, slots, moved=moved, now=step, window_steps=window)
        moved.update({x: step for x in d.promoted + d.demoted})
        promoted.append(len(d.promoted))
        fast = d.fast
    assert promoted[:3] == [Hysteresis.max_moves] * 3  # a shift moves at the full pace
    hottest = fast_sets(new, slots)
    hot_rows = sum(new[i, e] for i in range(n_layers) for e in hottest[i])
    assert sum(new[i, e] for i in range(n_layers) for e in fast[i]) > 0.9 * hot_rows
