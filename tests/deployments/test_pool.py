"""The expert pool scaled by Ray Serve's own autoscaling (custom policy fed by the workers'
busy fraction): under load a second pool worker is started and handed copies; when the
load stops Serve removes one, which hands its copies back first. No request fails."""
import time

import pytest
import requests

from deployments.pool_policy import desired_replicas
from tests.deployments.helpers import Load, load_expected

pytestmark = pytest.mark.slow

POLICY = {"enabled": True, "interval_s": 1, "window_steps": 10, "hot_threshold": 1.05, "min_gain": 0.0,
          "cooldown_s": 2, "extra_slots_per_layer": 4}
POOL = {"min_workers": 1, "max_workers": 2, "target_busy": 0.05, "upscale_delay_s": 1, "downscale_delay_s": 3}


@pytest.mark.parametrize("current,busy,target,expected", [
    (1, [0.9], 0.6, 2),        # busier than the target: grow
    (2, [0.3, 0.3], 0.6, 1),   # half as busy: shrink
    (2, [0.0, 0.0], 0.6, 1),   # idle: down to the minimum
    (1, [], 0.6, 1),           # no metrics yet: stay
    (3, [1.0, 1.0, 1.0], 0.5, 4),  # capped at the maximum
])
def test_desired_replicas(current, busy, target, expected):
    assert desired_replicas(current, busy, target, 1, 4) == expected


def _stats(base: str) -> dict:
    return requests.get(f"{base}/admin/stats", timeout=30).json()["data_plane"]


def _wait(base: str, what: str, ok, limit_s: float) -> dict:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            dp = _stats(base)
            if ok(dp):
                return dp
        except (KeyError, TypeError, ValueError, requests.RequestException):
            pass  # e.g. a 503 while the controller answers a hand-back
        time.sleep(0.5)
    raise AssertionError(f"{what} not within {limit_s} s: {_stats(base)}")


def _wait_ready(base: str, limit_s: float = 30) -> None:
    """Readiness reaches the ingress with its next poll of the controller (every 0.5 s)."""
    deadline = time.monotonic() + limit_s
    while requests.get(f"{base}/ready", timeout=30).status_code != 200:
        assert time.monotonic() < deadline, "not ready"
        time.sleep(0.2)


def test_pool_grows_under_load_and_hands_back_when_it_shrinks(cluster, checkpoint_factory):
    model = str(checkpoint_factory("mixtral"))
    c = cluster.deploy(model, 2, autoscaler=POLICY, pool=POOL,
                       worker={"num_cpus": 0.25, "torch_threads": 1, "service_time_per_token_s": 0.002})
    expected = load_expected(model)
    _wait(c.base, "the first pool worker registering", lambda dp: len(dp["worker_nodes"]) >= 3, 90)
    load = Load(c.base, clients=3)
    try:
        grown = _wait(c.base, "a second pool worker with copies",
                      lambda dp: len(dp["copies_per_worker"]) >= 4 and dp["copies_per_worker"][3] > 0, 150)
    finally:
        summary = load.stop()
    shrunk = _wait(c.base, "a pool worker leaving", lambda dp: dp["retired_workers"], 120)
    print(f"\npool: {summary}; copies per worker when grown {grown['copies_per_worker']}, "
          f"after one left {shrunk['copies_per_worker']} (retired {shrunk['retired_workers']})")
    assert load.failed == [], load.failed[:5]
    assert all(outs == {expected[p]} for p, outs in load.outputs.items())
    left = shrunk["retired_workers"][0]
    assert shrunk["copies_per_worker"][left] == 0
    _wait_ready(c.base)  # every expert still has a copy
    r = requests.post(f"{c.base}/v1/completions", timeout=60,
                      json={"prompt": [5, 17, 33], "max_tokens": 12, "temperature": 0, "ignore_eos": True})
    assert tuple(r.json()["choices"][0]["token_ids"]) == expected[0]
