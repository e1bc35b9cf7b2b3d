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
    ({"tiers": [HOST], "policy_file": "deployments/policies/default.yaml"}, "does not move copies between tiers"),
    ({"tiers": [{**HOST, "copies": 4}]}, "copies (4) must not exceed count (3)"),
    ({"tiers": [HOST, {**FAST, "copies": 2}]}, "copies is the host tier's setting"),
])
def test_refusals_name_the_field(args, message):
    with pytest.raises(ValueError, match="bad application config") as e:
        app_config(args)
    assert message in str(e.value)
