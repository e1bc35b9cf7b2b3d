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


@pytest.mark.parametrize("args,message", [
    ({"tiers": [FAST]}, "a host tier is needed"),
    ({"tiers": [HOST, HOST]}, "each tier once"),
    ({"tiers": [HOST, {**FAST, "num_gpus": 0}]}, "device cuda needs num_gpus > 0"),
    ({"tiers": [{**HOST, "budget_bytes": "lots"}]}, "tiers.0.budget_bytes"),
    ({"tiers": [{**HOST, "name": "warm"}]}, "tiers.0.name"),
    ({"tiers": [HOST], "num_workers": 4}, "differs from the tiers' workers (3)"),
    ({"tiers": [HOST], "expert_copies": 2, "num_workers": 3}, "tiers decide the copies"),
])
def test_refusals_name_the_field(args, message):
    with pytest.raises(ValueError, match="bad application config") as e:
        app_config(args)
    assert message in str(e.value)
