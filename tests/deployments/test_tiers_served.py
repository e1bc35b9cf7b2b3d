"""Expert tiers in the served application (issue 23), on a real Serve cluster: a fast tier (one
worker, room for a few experts) and a host tier (two workers, two copies of every other expert).
Greedy output is identical to the in-process engine (tiers off), rows reach both tiers, and a
worker of each tier is killed in turn with no request lost (every expert has a second copy)."""

import pytest
import requests
import torch

from cluster.loader import open_model
from tests.deployments.helpers import Load, kill_replica, load_expected, plane_stats, wait_healed

pytestmark = pytest.mark.slow


def _tiers(model: str) -> list[dict]:
    copy = open_model(model)[2].expert_bytes(torch.float32)  # CPU workers hold float32 copies
    return [{"name": "fast", "count": 1, "budget_bytes": 3 * copy, "num_cpus": 0.25},
            {"name": "host", "count": 2, "copies": 2, "budget_bytes": 1 << 30, "num_cpus": 0.25}]


def test_tiers_serve_identical_output_and_survive_a_worker_of_each_tier(cluster, checkpoint_factory):
    model = str(checkpoint_factory("mixtral"))
    c = cluster.deploy(model, 3, tiers=_tiers(model), expert_call_timeout_s=5)
    expected = load_expected(model)
    dp = plane_stats(c.base)
    assert dp["copies_per_tier"]["fast"] == 3
    load = Load(c.base)
    summaries = []
    try:
        load.wait_ok(4)
        for worker in ("expert-worker-0", "expert-worker-1"):  # the fast worker, then a host worker
            before = load.ok
            kill_replica(worker)
            wait_healed(c.base)
            load.wait_ok(before + 4)
            summaries.append(f"{worker}: {load.ok - before} ok since the kill")
    finally:
        summary = load.stop()
    dp = plane_stats(c.base)
    print(f"\ntiers, a worker of each tier killed: {summary}; {summaries}; rows per tier {dp['rows_per_tier']}, "
          f"failovers {dp['failovers']}")
    assert load.failed == [], load.failed[:5]
    assert all(outs == {expected[p]} for p, outs in load.outputs.items())  # identical to in-process
    assert dp["rows_per_tier"]["fast"] > 0 and dp["rows_per_tier"]["host"] > 0
    assert requests.get(f"{c.base}/ready", timeout=30).status_code == 200
