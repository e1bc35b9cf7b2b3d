"""Property tests of the online planner (issue 14): it never fails on inputs that have a valid placement.

Random expert loads [L, E], workers with slot capacities, byte budgets and per-layer limits
(0 = retired), extra copies, max copies per expert, hierarchical and co-activation on or off,
with or without a current placement. A valid placement exists exactly when one copy per
expert fits: then the plan must cover every expert, stay within every limit and never put
two copies of one expert on one worker; otherwise it must raise, naming the limit.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.placement import Placement, round_robin
from cluster.rebalance import Worker, plan, worker_imbalance

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
limit = st.none() | st.integers(0, 12)


@st.composite
def cases(draw):
    n_layers, n_exp, n_workers = draw(st.integers(1, 3)), draw(st.integers(1, 10)), draw(st.integers(1, 6))
    loads = draw(st.sampled_from(["random", "even", "zero", "one_hot"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    loads = {"random": rng.zipf(1.5, (n_layers, n_exp)).astype(float), "even": np.full((n_layers, n_exp), 7.0),
             "zero": np.zeros((n_layers, n_exp)), "one_hot": np.eye(n_layers, n_exp) * 100}[loads]
    expert_bytes = draw(st.integers(1, 1000))
    workers = [Worker(f"node-{draw(st.integers(0, 2))}", draw(limit), draw(st.none() | st.integers(0, 30)),
                      draw(st.none() | st.integers(0, 30 * expert_bytes))) for _ in range(n_workers)]
    coactivation = rng.integers(0, 5, (n_layers, n_exp, n_exp)).astype(float) if draw(st.booleans()) else None
    kwargs = dict(extra_per_layer=draw(st.integers(0, 12)), hierarchical=draw(st.booleans()),
                  max_copies=draw(st.none() | st.integers(1, 5)), coactivation=coactivation, expert_bytes=expert_bytes)
    if draw(st.booleans()):
        slots = [(layer, e) for layer in range(n_layers) for e in range(n_exp)]
        held_by = n_workers + draw(st.integers(0, 1))  # a worker beyond the list: it left
        kwargs["current"] = round_robin(slots, held_by, draw(st.integers(1, held_by)))
    return loads, workers, kwargs


def room(worker: Worker, n_layers: int, expert_bytes: int) -> float:
    limits = [worker.slots, None if worker.budget_bytes is None else worker.budget_bytes // expert_bytes,
              None if worker.layer_slots is None else worker.layer_slots * n_layers]
    return min((x for x in limits if x is not None), default=float("inf"))


def check_valid(p, loads, workers, kwargs) -> None:
    n_layers, n_exp = loads.shape
    copies = p.placement.copies()
    assert set(copies) == {(layer, e) for layer in range(n_layers) for e in range(n_exp)}  # every expert
    for ws in copies.values():
        assert len(set(ws)) == len(ws)  # no two copies of one expert on one worker
        assert len(ws) <= (kwargs["max_copies"] or len(workers))
    for w, (slots, worker) in enumerate(zip(p.placement.workers, workers)):
        assert len(slots) <= room(worker, n_layers, kwargs["expert_bytes"])
        if worker.budget_bytes is not None:
            assert len(slots) * kwargs["expert_bytes"] <= worker.budget_bytes
        per_layer = np.bincount([layer for layer, _ in slots], minlength=n_layers)
        assert worker.layer_slots is None or per_layer.max() <= worker.layer_slots
        assert p.worker_bytes[w] == len(slots) * kwargs["expert_bytes"]
    extras = np.bincount([layer for slots in p.placement.workers for layer, _ in slots], minlength=n_layers) - n_exp
    assert extras.max() <= kwargs["extra_per_layer"]


def check_moves(p, kwargs) -> None:
    current = kwargs.get("current") or Placement(tuple(() for _ in p.placement.workers))
    old = {(w, s) for w, slots in enumerate(current.workers) for s in slots}
    new = {(w, s) for w, slots in enumerate(p.placement.workers) for s in slots}
    assert p.moves == len(new - old) and p.retires == len(old - new)
    assert p.changed == (new != old)


@SETTINGS
@given(cases())
def test_the_planner_returns_a_valid_placement_whenever_one_exists(case):
    loads, workers, kwargs = case
    n_layers, n_exp = loads.shape
    rooms = [room(w, n_layers, kwargs["expert_bytes"]) for w in workers]
    active = [w for w, r in enumerate(rooms) if r > 0 and workers[w].layer_slots != 0]
    if not active or sum(rooms[w] for w in active) < n_layers * n_exp:
        with pytest.raises(ValueError, match="at most|no worker may hold"):
            plan(loads, moe_layers=list(range(n_layers)), workers=workers, **kwargs)
        return
    p = plan(loads, moe_layers=list(range(n_layers)), workers=workers, **kwargs)
    check_valid(p, loads, workers, kwargs)
    check_moves(p, kwargs)
    assert all(not slots for w, slots in enumerate(p.placement.workers) if w not in active)  # retired: nothing
    ratios = worker_imbalance(loads, list(range(n_layers)), p.placement, active=active)
    assert p.max_over_mean == pytest.approx(max(ratios))


@SETTINGS
@given(cases())
def test_a_valid_current_placement_changes_only_for_better_balance_or_fewer_copies(case):
    loads, workers, kwargs = case
    kwargs = {**kwargs, "current": None}
    n_layers = loads.shape[0]
    try:
        first = plan(loads * np.random.default_rng(0).random(loads.shape), moe_layers=list(range(n_layers)),
                     workers=workers, **kwargs)
    except ValueError:
        return  # no valid placement: covered above
    p = plan(loads, moe_layers=list(range(n_layers)), workers=workers, **{**kwargs, "current": first.placement})
    check_valid(p, loads, workers, kwargs)
    active = [w for w, worker in enumerate(workers) if room(worker, n_layers, kwargs["expert_bytes"]) > 0
              and worker.layer_slots != 0]
    before = worker_imbalance(loads, list(range(n_layers)), first.placement, active=active)
    after = worker_imbalance(loads, list(range(n_layers)), p.placement, active=active)
    for layer in range(n_layers):
        old = sorted((w, s) for w, slots in enumerate(first.placement.workers) for s in slots if s[0] == layer)
        new = sorted((w, s) for w, slots in enumerate(p.placement.workers) for s in slots if s[0] == layer)
        if old != new:
            assert len(new) < len(old) or after[layer] < before[layer] - 1e-3
