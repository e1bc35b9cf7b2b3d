"""Expert tiers in the application YAML (issue 23): pydantic groups, one clear error per refusal."""
import pytest

from deployments.config import app_config
from deployments.tier_config import tier_group_of, tier_workers

FAST = {"name": "fast", "count": 2, "device": "cuda", "num_gpus": 1, "budget_bytes": "20GiB",
        "label_selector": {"moe-cluster/role": "experts-fast"}}
HOST = {"name": "host", "count": 3, "budget_bytes": 200 << 30, "num_cpus": 8}


def test_tiers_set_the_workers():
    cfg = app_config({"tiers": [HOST, FAST]})
    assert cfg.num_workers == 5
    workers = tier_workers(cfg.tiers)
    assert [w.tier for w in workers] == ["fast", "fast", "host", "host", "host"]  # fast tier first
    assert workers[0].budget_bytes == 20 << 30 and workers[4].budget_bytes == 200 << 30
    assert tier_group_of(cfg.tiers, 1).name == "fast" and tier_group_of(cfg.tiers, 2).num_cpus == 8
    assert app_config({}).tiers == []


def test_initial_placement_counts_each_tier_in_its_own_dtype():
    from deployments.tier_config import initial_placement

    fast = {**FAST, "count": 1, "budget_bytes": 4 * 200}  # cuda (bf16 copies, 200 bytes): 4 copies
    host = {**HOST, "count": 2, "copies": 2, "budget_bytes": 64 * 400}  # cpu (float32, 400 bytes): 64 copies
    cfg = app_config({"tiers": [fast, host]})
    placement = initial_placement(cfg.tiers, [0, 1], 8, lambda device: 200 if device == "cuda" else 400)
    assert [len(w) for w in placement.workers][0] == 4  # 2 per layer: spread evenly before any load
    copies = placement.copies()
    assert all(len([w for w in copies[x] if w > 0]) == 2 for x in copies if 0 not in copies[x])  # 2 host copies


@pytest.mark.parametrize("args,message", [
    ({"tiers": [FAST]}, "a host tier is needed"),
    ({"tiers": [HOST, HOST]}, "each tier once"),
    ({"tiers": [HOST, {**FAST, "num_gpus": 0}]}, "device cuda needs num_gpus > 0"),
    ({"tiers": [{**HOST, "budget_bytes": "lots"}]}, "tiers.0.budget_bytes"),
    ({"tiers": [{**HOST, "name": "warm"}]}, "tiers.0.name"),
    ({"tiers": [HOST], "num_workers": 4}, "differs from the tiers' workers (3)"),
    ({"tiers": [HOST], "expert_copies": 2, "num_workers": 3}, "tiers decide the copies"),
    ({"tiers": [{**HOST, "copies": 4}]}, "copies (4) must not exceed count (3)"),
    ({"tiers": [HOST, {**FAST, "copies": 2}]}, "copies is the host tier's setting"),
])
def test_refusals_name_the_field(args, message):
    with pytest.raises(ValueError, match="bad application config") as e:
        app_config(args)
    assert message in str(e.value)


def test_rows_copies_and_bytes_per_tier_reach_admin_stats_and_metrics():
    from types import SimpleNamespace

    from prometheus_client import generate_latest

    from cluster.placement import Placement, Table, WorkerRef
    from deployments import metrics
    from deployments.cluster_view import cluster_stats, update_metrics
    from deployments.messages import RouterReport

    table = Table(3, Placement((((0, 0),), ((0, 0), (0, 1)), ((0, 1),))),
                  (WorkerRef("a:1", tier="fast"), WorkerRef("b:1", tier="host"), WorkerRef("c:1", tier="host")))
    spec = SimpleNamespace(moe_layers=(0,), expert_bytes=100)
    plane = lambda fast, host: {"data_plane": {"rows_per_tier": {"fast": fast, "host": host}}}  # noqa: E731
    reports = {r: RouterReport("b", r, "n", 3, [[1.0, 2.0]], [[1, 2]], None, (), plane(*rows))
               for r, rows in (("r0", (30, 5)), ("r1", (10, 1)))}
    state = SimpleNamespace(table=table)
    dp = cluster_stats(reports, ["r0", "r1"], state, spec, 2)["data_plane"]
    assert dp["rows_per_tier"] == {"fast": 40, "host": 6} and dp["copies_per_tier"] == {"fast": 1, "host": 3}
    update_metrics(reports, ["r0", "r1"], state, spec)
    text = generate_latest(metrics.CLUSTER).decode()
    assert 'moe_tier_expert_rows_total{tier="fast"} 40.0' in text
    assert 'moe_tier_expert_copies{tier="host"} 3.0' in text and 'moe_tier_expert_copy_bytes{tier="host"} 300.0' in text


def test_static_tiers_put_the_profile_hottest_experts_on_the_fast_tier_and_hold(checkpoint_factory, tmp_path):
    """Mode static with tiers (the "frequency" baseline): the app starts with the fast tier's room on
    the profile's hottest experts; the controller's static step then holds (nothing to move), and
    re-plans from the profile when the table differs (a new profile file)."""
    import asyncio

    import numpy as np
    import torch

    from cluster.loader import open_model
    from cluster.placement import Table, WorkerRef
    from cluster.profile import save_profile
    from deployments.app import spec_of
    from deployments.membership import Membership
    from deployments.rebalancer import Rebalancer
    from deployments.table_state import TableState
    from deployments.tier_config import initial_placement

    model = str(checkpoint_factory("mixtral"))
    mc = open_model(model)[2]
    layers, eb = list(mc.moe_layer_ids), mc.expert_bytes(torch.float32)
    loads = np.ones((len(layers), mc.num_experts))
    loads[0, 5], loads[-1, 3] = 50.0, 40.0  # the two hottest experts of all layers
    save_profile(tmp_path / "p.json", loads, layers)
    tiers = [{"name": "fast", "count": 1, "budget_bytes": 2 * eb},
             {"name": "host", "count": 2, "budget_bytes": 1 << 30}]
    cfg = app_config({"model": model, "tiers": tiers,
                      "autoscaler": {"mode": "static", "profile_file": str(tmp_path / "p.json")}})
    spec = spec_of(cfg)
    assert set(spec.placement.workers[0]) == {(layers[0], 5), (layers[-1], 3)}
    spec.placement.check_covers(mc.experts())

    refs = (WorkerRef("a:1", tier="fast"), WorkerRef("b:1", tier="host"), WorkerRef("c:1", tier="host"))
    state = TableState(Table(1, spec.placement, refs))
    state._started -= 10  # past the restart grace period
    rebalancer = Rebalancer(cfg.policy(), state, Membership([], "s"), moe_layers=layers, expert_bytes=eb,
                            tiers=spec.tiers)
    assert asyncio.run(rebalancer.step(np.zeros_like(loads), None)) == "static"  # started there: holds
    assert rebalancer.history == [] and state.table.version == 1
    uniform = initial_placement(cfg.tiers, layers, mc.num_experts, lambda d: eb)  # no profile: spread evenly
    state.table = Table(1, uniform, refs)
    planned = rebalancer.static_plan().placement
    assert set(planned.workers[0]) == {(layers[0], 5), (layers[-1], 3)}
    save_profile(tmp_path / "other.json", loads[:, :4], layers)
    rebalancer.set_policy(cfg.policy().model_copy(update={"profile_file": str(tmp_path / "other.json")}))
    with pytest.raises(ValueError, match="other.json: the profile covers"):
        rebalancer.static_plan()
