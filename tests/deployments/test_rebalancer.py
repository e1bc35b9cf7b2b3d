"""The controller's placement changes against real expert workers (standalone processes, gRPC data
plane), without Ray: the progress deadline and its metrics, staged moves, retirement when traffic
evens out, byte budgets, and the static EPLB plan."""
import asyncio
from dataclasses import replace

import numpy as np
import pytest
import torch

from cluster.loader import open_model
from cluster.placement import Table, round_robin
from cluster.profile import save_profile
from deployments import metrics
from deployments.membership import Membership
from deployments.policy import AutoscalePolicy
from deployments.rebalancer import Rebalancer
from deployments.table_state import TableState
from tests.deployments.helpers import SECRET, start_worker, worker_ref



@pytest.fixture
def setup(checkpoint_factory):
    """4 standalone workers, round-robin placement; returns (model cfg, table, membership, layers)."""
    model = str(checkpoint_factory("mixtral"))
    _, _, cfg = open_model(model)
    placement = round_robin(cfg.experts(), 4)
    procs = [start_worker(model, experts) for experts in placement.workers]
    try:
        refs = tuple(worker_ref(p) for p in procs)
        yield cfg, Table(1, placement, refs), Membership([], SECRET), list(cfg.moe_layer_ids)
    finally:
        for p in procs:
            p.kill()
            p.wait()


def _skewed(layers, experts: int) -> np.ndarray:
    loads = np.ones((len(layers), experts))
    loads[:, 0] = 40.0  # expert 0 of every layer is hot
    return loads


def _rebalancer(state, membership, layers, cfg, **policy) -> Rebalancer:
    return Rebalancer(AutoscalePolicy(interval_s=1, cooldown_s=0, hot_threshold=1.05, min_gain=0.01,
                                      switch_timeout_s=1.0, **policy),
                      state, membership, moe_layers=layers, expert_bytes=cfg.expert_bytes(torch.float32))


def _held(membership, table):
    return [sorted(asyncio.run(membership.holds(ref))) for ref in table.workers]


def _confirmed(state: TableState) -> None:
    state._started -= 10  # past the restart grace period: a fresh controller whose routers agree


def test_a_switch_no_router_makes_is_abandoned_counted_and_retried(setup):
    cfg, table, membership, layers = setup
    state = TableState(table)
    _confirmed(state)
    state.seen("stuck-router", table.version)  # routes by v1 and never reports again within the test
    rebalancer = _rebalancer(state, membership, layers, cfg, extra_slots_per_layer=4)
    abandoned = metrics.REBALANCES.labels("abandoned")._value.get()

    async def run():
        state.seen("stuck-router", 1)
        return await rebalancer.step(_skewed(layers, cfg.num_experts), None)

    assert asyncio.run(run()) == "abandoned"
    assert metrics.REBALANCES.labels("abandoned")._value.get() == abandoned + 1
    new = state.table
    assert new.version == 2 and rebalancer.history[-1]["outcome"] == "abandoned"
    # nothing was retired: every worker still holds what v1 gave it, and the new copies too
    held = _held(membership, new)
    for w in range(4):
        assert set(table.placement.workers[w]) <= set(held[w]) and set(new.placement.workers[w]) <= set(held[w])
    # the router catches up: the next step retires what v2 no longer has
    state.seen("stuck-router", new.version)
    asyncio.run(rebalancer.retry_retirements())
    assert _held(membership, new) == [sorted(ws) for ws in new.placement.workers]


def test_staged_moves_switch_through_several_versions_each_covering_every_expert(setup):
    cfg, table, membership, layers = setup
    state = TableState(table)
    _confirmed(state)
    rebalancer = _rebalancer(state, membership, layers, cfg, extra_slots_per_layer=4, max_copies_per_stage=2)
    seen = []

    async def follow():  # a router that switches to every table as soon as it is published
        while True:
            seen.append(state.table.version)
            state.seen("router", state.table.version)
            await asyncio.sleep(0.05)

    async def run():
        task = asyncio.create_task(follow())
        try:
            return await rebalancer.step(_skewed(layers, cfg.num_experts), None)
        finally:
            task.cancel()

    assert asyncio.run(run()) == "done"
    assert rebalancer.history[-1]["stages"] >= 2 and state.table.version == 1 + rebalancer.history[-1]["stages"]
    assert _held(membership, state.table) == [sorted(ws) for ws in state.table.placement.workers]


def test_extra_copies_retire_when_traffic_evens_out(setup):
    cfg, table, membership, layers = setup
    state = TableState(table)
    _confirmed(state)
    rebalancer = _rebalancer(state, membership, layers, cfg, extra_slots_per_layer=4)
    even = np.ones((len(layers), cfg.num_experts))
    grown = []

    async def run():
        task = asyncio.create_task(_keep_up(state))  # one event loop: the controller has one
        try:
            first = await rebalancer.step(_skewed(layers, cfg.num_experts), None)
            grown.append(sum(map(len, state.table.placement.workers)))
            # the copies of the once-hot expert now only skew the split: a plan without them is better
            assert rebalancer.decide(even, None).reason in ("retire", "rebalance")
            return first, await rebalancer.step(even, None)
        finally:
            task.cancel()

    assert asyncio.run(run()) == ("done", "done")
    assert grown[0] > len(cfg.experts())  # extra copies of the hot experts
    assert sum(map(len, state.table.placement.workers)) == len(cfg.experts())  # back to one copy each
    assert _held(membership, state.table) == [sorted(ws) for ws in state.table.placement.workers]  # memory freed


async def _keep_up(state):
    while True:
        state.seen("router", state.table.version)
        await asyncio.sleep(0.05)


def test_the_byte_budget_is_never_exceeded(setup):
    cfg, table, membership, layers = setup
    state = TableState(table)
    _confirmed(state)
    per_copy = cfg.expert_bytes(torch.float32)
    budget = (len(cfg.experts()) // 4 + 2) * per_copy  # room for 2 extra copies per worker
    rebalancer = _rebalancer(state, membership, layers, cfg, extra_slots_per_layer=8, memory_budget_bytes=budget)
    decision = rebalancer.decide(_skewed(layers, cfg.num_experts), None)
    assert decision.reason == "rebalance"
    assert all(len(ws) * per_copy <= budget for ws in decision.placement.workers)
    assert sum(map(len, decision.placement.workers)) > len(cfg.experts())


def test_static_mode_plans_once_from_a_profile_with_eplb(setup, tmp_path):
    from cluster.eplb import rebalance_experts, to_placement

    cfg, table, membership, layers = setup
    profile = tmp_path / "profile.json"
    loads = _skewed(layers, cfg.num_experts)
    save_profile(profile, loads, layers, {"test": True})
    state = TableState(table)
    _confirmed(state)
    rebalancer = _rebalancer(state, membership, layers, cfg, mode="static", profile_file=str(profile),
                             extra_slots_per_layer=4)

    def placed(loads):
        expected = to_placement(rebalance_experts(loads=loads, extra_per_layer=4, num_workers=4), layers)
        return [set(w) for w in state.table.placement.workers] == [set(w) for w in expected.workers]

    async def run():
        task = asyncio.create_task(_keep_up(state))
        try:
            first = await rebalancer.step(np.zeros_like(loads), None)
            second = await rebalancer.step(np.ones_like(loads), None)  # live load does not matter: it holds
            assert (first, second) == ("done", "static") and placed(loads)
            assert rebalancer.history[-1]["reason"] == "static" and len(rebalancer.history) == 1
            # PUT /admin/policy in static mode plans again: a profile re-recorded at the same path (or a
            # switch back from online) kept the old placement while the answer said static
            rebalancer.set_policy(rebalancer.policy.model_copy(update={"min_gain": 0.02}))
            assert await rebalancer.step(np.ones_like(loads), None) == "static"  # nothing to move: held
            assert len(rebalancer.history) == 1
            loads[:, 0], loads[:, 1] = 1.0, 40.0
            save_profile(profile, loads, layers)
            rebalancer.set_policy(rebalancer.policy.model_copy())
            assert await rebalancer.step(np.ones_like(loads), None) == "done"
            assert placed(loads) and len(rebalancer.history) == 2
        finally:
            task.cancel()

    asyncio.run(run())


def test_tiers_promote_a_hot_expert_to_the_fast_worker(checkpoint_factory):
    """Expert tiers (issue 23): a fast worker with room for 2 copies per table and two host workers
    holding every expert; skewed load promotes the hot experts, staged, every expert covered."""
    from cluster.tiers import FAST, HOST, TierLayout, TierWorker, tier_placement, uniform_sets

    model = str(checkpoint_factory("mixtral"))
    _, _, cfg = open_model(model)
    layers, eb = list(cfg.moe_layer_ids), cfg.expert_bytes(torch.float32)
    workers = (TierWorker(FAST, 2 * eb), TierWorker(HOST, 64 * eb), TierWorker(HOST, 64 * eb))
    placement = tier_placement(uniform_sets(len(layers), cfg.num_experts, 2), layers, cfg.num_experts,
                               list(workers), eb)
    procs = [start_worker(model, experts) for experts in placement.workers]
    try:
        refs = tuple(replace(worker_ref(p), tier=tw.tier) for p, tw in zip(procs, workers))  # as the app's workers
        state = TableState(Table(1, placement, refs))
        _confirmed(state)
        membership = Membership([], SECRET)
        rebalancer = Rebalancer(AutoscalePolicy(interval_s=1, cooldown_s=0, switch_timeout_s=1.0), state, membership,
                                moe_layers=layers, expert_bytes=eb, tiers=TierLayout(workers, eb))
        loads = np.ones((len(layers), cfg.num_experts))
        loads[-1, -1] = 40.0  # the last expert of the last layer turns hot
        promoted = metrics.TIER_MOVES.labels("promoted")._value.get()
        fast_bytes = metrics.TIER_BYTES_MOVED.labels("fast")._value.get()

        async def follow():  # a router that switches to every table as soon as it is published
            while True:
                state.seen("router", state.table.version)
                await asyncio.sleep(0.05)

        async def run():
            task = asyncio.create_task(follow())
            try:
                return await rebalancer.step(loads, None)
            finally:
                task.cancel()

        assert asyncio.run(run()) == "done"
        new = state.table.placement
        assert (layers[-1], cfg.num_experts - 1) in new.workers[0] and len(new.workers[0]) == 2
        new.check_covers(cfg.experts())
        assert _held(membership, state.table) == [sorted(ws) for ws in new.workers]
        assert rebalancer.history[-1]["reason"] == "promote"
        assert metrics.TIER_MOVES.labels("promoted")._value.get() >= promoted + 1
        added = {tier: sum(len(set(new.workers[w]) - set(placement.workers[w])) * eb
                           for w, tw in enumerate(workers) if tw.tier == tier) for tier in (FAST, HOST)}
        assert added[FAST] > 0  # bytes moved per tier: in the admin history and the metric
        assert rebalancer.history[-1]["bytes_loaded_per_tier"] == {t: n for t, n in added.items() if n}
        assert metrics.TIER_BYTES_MOVED.labels("fast")._value.get() == fast_bytes + added[FAST]
    finally:
        for p in procs:
            p.kill()
            p.wait()
