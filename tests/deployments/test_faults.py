"""Faults under steady load on a real Serve cluster: a killed expert worker replica (with and
without a second copy of its experts) and a restarted Serve controller. Every test is bounded
in time and counts the requests it sent, that succeeded and that failed (printed with -s)."""
import time

import pytest

from tests.deployments.helpers import Load, kill_replica, load_expected, plane_stats, wait_healed

pytestmark = pytest.mark.slow


def test_killed_worker_with_a_second_copy_loses_no_request(cluster, checkpoint_factory):
    model = str(checkpoint_factory("mixtral"))
    c = cluster.deploy(model, 2, expert_copies=2, expert_call_timeout_s=5)
    expected = load_expected(model)
    load = Load(c.base)
    try:
        load.wait_ok(6)
        killed, t_kill = kill_replica("expert-worker-0"), time.monotonic()
        failovers_seen = 0
        deadline = time.monotonic() + 60
        while failovers_seen == 0 and time.monotonic() < deadline:  # traffic met the dead worker
            failovers_seen = plane_stats(c.base)["failovers"]
            time.sleep(0.2)
        dp = wait_healed(c.base)  # Serve replaced the replica and the router put it back
        outage = time.monotonic() - t_kill
        ok_at_heal = load.ok
        load.wait_ok(ok_at_heal + 6)
    finally:
        summary = load.stop()
    print(f"\nkill a worker, second copy exists: {summary}; worker back after {outage:.1f} s; "
          f"failovers {dp['failovers']}, failed expert calls {dp['failures']}")
    assert load.failed == [], load.failed[:5]
    assert dp["failovers"] >= 1 and failovers_seen >= 1
    assert all(outs == {expected[p]} for p, outs in load.outputs.items())  # identical to in-process
    import ray

    assert killed not in {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}


def test_killed_worker_without_a_copy_fails_clearly_then_resumes(cluster, checkpoint_factory):
    model = str(checkpoint_factory("mixtral"))
    c = cluster.deploy(model, 2, expert_copies=1, expert_call_timeout_s=5)
    expected = load_expected(model)
    load = Load(c.base, clients=2)
    try:
        load.wait_ok(4)
        kill_replica("expert-worker-1")
        t_kill = time.monotonic()
        deadline = time.monotonic() + 60
        while not load.failed and time.monotonic() < deadline:
            time.sleep(0.1)
        wait_healed(c.base)
        outage = time.monotonic() - t_kill
        ok_at_heal = load.ok
        load.wait_ok(ok_at_heal + 4)  # service resumed once Serve's replacement was back
    finally:
        summary = load.stop()
    slowest = max((t for _, _, t in load.failed), default=0)
    print(f"\nkill a worker, no second copy: {summary} (during the {outage:.1f} s outage; slowest failure "
          f"{slowest:.2f} s; {load.failed[0][1] if load.failed else ''})")
    assert load.failed, "killing the only copy should fail the requests that needed it"
    for status, message, seconds in load.failed:
        assert status == 503 and "no" in message and "live copy" in message, message
        assert seconds < 30  # a clear error, not a hang
    assert all(outs == {expected[p]} for p, outs in load.outputs.items())


def test_controller_restart_keeps_traffic_flowing(cluster, checkpoint_factory):
    import ray
    from ray import serve

    model = str(checkpoint_factory("mixtral"))
    c = cluster.deploy(model, 2, expert_copies=1, expert_call_timeout_s=5)  # the previous test's deployment
    load = Load(c.base)
    try:
        load.wait_ok(4)
        ray.kill(ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve"), no_restart=False)
        ok_at_kill = load.ok
        load.wait_ok(ok_at_kill + 10)  # requests keep succeeding while the controller restarts
        deadline = time.monotonic() + 120
        status = None
        while time.monotonic() < deadline:
            try:
                status = serve.status().applications["moe"].status
                if status == "RUNNING":
                    break
            except Exception:  # noqa: BLE001 - controller still restarting
                pass
            time.sleep(0.5)
        load.wait_ok(load.ok + 4)
    finally:
        summary = load.stop()
    print(f"\nrestart the Serve controller: {summary}")
    assert status == "RUNNING"
    assert load.failed == [], load.failed[:5]
