"""Expert tiers in the served application (issue 23), on a real Serve cluster: a fast tier (one
worker, room for a few experts) and a host tier (two workers, two copies of every other expert).
Greedy output is identical to the in-process engine (tiers off), rows reach both tiers, and a
worker of each tier is killed in turn with no request lost (every expert has a second copy)."""

import statistics
import threading
import time

import pytest
import requests
import torch

from cluster.loader import open_model
from tests.deployments.helpers import LOAD_PROMPTS, Load, kill_replica, load_expected, plane_stats, wait_healed

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


# online tiers: a short window and no noise test, so the hot experts of this small load are promoted
# within seconds (the noise test is covered in tests/cluster/test_tiers.py)
ONLINE = dict(interval_s=0.5, window_steps=4, cooldown_s=0, tier_noise_z=0)


class Streams:
    """`clients` threads streaming greedy completions in a loop: the arrival time of every token event."""

    def __init__(self, base: str, clients: int = 2):
        self.base, self.stop_event = base, threading.Event()
        self.arrivals: list[list[float]] = []  # per stream, token event times (time.time())
        self.failed: list[str] = []
        self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(clients)]
        for t in self.threads:
            t.start()

    def _loop(self, client: int) -> None:
        body = {"prompt": LOAD_PROMPTS[client % len(LOAD_PROMPTS)], "max_tokens": 24, "temperature": 0,
                "ignore_eos": True, "stream": True}
        while not self.stop_event.is_set():
            times = []
            try:
                with requests.post(f"{self.base}/v1/completions", json=body, stream=True, timeout=60) as r:
                    for line in r.iter_lines():
                        if line.startswith(b"data: ") and line != b"data: [DONE]":
                            times.append(time.time())
                ok = r.status_code == 200
            except requests.RequestException as e:
                ok, times = False, [repr(e)]
            (self.arrivals.append(times) if ok else self.failed.append(str(times[:1])))

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=90)

    def gaps(self) -> list[tuple[float, float]]:
        """(time, gap s) of every inter-token gap."""
        return [(b, b - a) for times in self.arrivals for a, b in zip(times, times[1:])]


def _p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) > 1 else float("nan")


def test_online_promotion_under_load_loses_nothing(cluster, checkpoint_factory):
    """Online tiers under load: the controller promotes the experts the traffic makes hot onto the fast
    worker (staged) while requests stream; none fails and greedy output stays identical. The
    inter-token p99 of gaps that overlap a promotion (its load and switch) over the rest is printed,
    not asserted (the issue's goal, ≤ 1.2: a timed figure on a shared machine)."""
    model = str(checkpoint_factory("mixtral"))
    c = cluster.deploy(model, 3, tiers=_tiers(model), expert_call_timeout_s=5, autoscaler=ONLINE)
    expected = load_expected(model)
    load, streams = Load(c.base), Streams(c.base)
    done: list[dict] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not done:
            time.sleep(0.5)
            done = [h for h in requests.get(f"{c.base}/admin/autoscaler", timeout=30).json()["history"]
                    if h["outcome"] == "done"]
        time.sleep(3)  # traffic on the new table
    finally:
        summary = load.stop()
        streams.stop()
    assert done, "no promotion within 120 s"
    moves = [(h["time"] - h["seconds"], h["time"]) for h in done]
    gaps = streams.gaps()
    inside = [g for t, g in gaps if any(a <= t <= b for a, b in moves)]
    steady = [g for t, g in gaps if not any(a - 1 <= t <= b + 1 for a, b in moves)]
    print(f"\nonline tiers under load: {summary}; {len(streams.arrivals)} streams, {len(streams.failed)} failed; "
          f"{len(done)} promotion(s), first {done[0]}; inter-token p99 in promotion windows "
          f"{1000 * _p99(inside):.1f} ms ({len(inside)} gaps) / steady {1000 * _p99(steady):.1f} ms "
          f"({len(steady)} gaps) = {_p99(inside) / _p99(steady):.2f}")
    assert load.failed == [] and streams.failed == [], (load.failed[:3], streams.failed[:3])
    assert all(outs == {expected[p]} for p, outs in load.outputs.items())  # identical to in-process
    fast = plane_stats(c.base)["copies_per_tier"]["fast"]
    assert done[0]["copies_added"] > 0 and fast <= 3  # promoted within the fast worker's budget
