"""Security and load limits on a running server: API key, body/header size, queue limit,
request timeout, client disconnect (its KV-cache blocks are freed).

Time-dependent behaviour is made independent of the machine: every engine step
takes at least STEP_DELAY_S (the engine's slow-step hook), so a 500-token request
cannot finish inside the 6 s timeout however fast the machine is, and 400-token
streams are still running when the test looks at them.
"""
import json
import time

import grpc
import pytest
import requests

from tests.deployments.clients import grpc_request, grpc_stub
from tests.helpers import DEMO

pytestmark = pytest.mark.slow
KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
STEP_DELAY_S = 0.1  # 500 tokens ≥ 50 s ≫ the 6 s timeout; 400-token streams last ≥ 40 s
LIMITS = dict(api_key=KEY, max_num_seqs=2, max_queued_requests=1, request_timeout_s=6.0, max_body_bytes=65536,
              engine_step_delay_s=STEP_DELAY_S)


@pytest.fixture(scope="module")
def server(cluster):
    return cluster.deploy(str(DEMO), 2, **LIMITS)


def post(server, body, headers=AUTH, **kw):
    return requests.post(f"{server.base}/v1/completions", json=body, headers=headers, timeout=120, **kw)


def stats(server) -> dict:
    return requests.get(f"{server.base}/admin/stats", headers=AUTH, timeout=30).json()


def wait_for(server, ok, what: str, timeout=30.0) -> dict:
    """Router figures reach /admin/stats with the routers' next report (every 0.5 s): poll, bounded."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = stats(server)
        if ok(s):
            return s
        time.sleep(0.2)
    raise AssertionError(f"{what} not within {timeout} s: {s}")


def wait_idle(server, timeout=30.0) -> dict:
    return wait_for(server, lambda s: s["active_requests"] == 0 and s["free_seq_slots"] == LIMITS["max_num_seqs"]
                    and s["free_kv_blocks"] == s["kv_blocks"], "server idle (every KV block free)", timeout)


def test_api_key_on_every_route_but_health(server):
    body = {"prompt": "def f(", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = post(server, body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == 401
    assert post(server, body).status_code == 200
    assert requests.get(f"{server.base}/health", timeout=30).status_code == 200
    for path in ("/v1/models", "/metrics", "/admin/load", "/admin/stats"):
        assert requests.get(f"{server.base}{path}", timeout=30).status_code == 401
        assert requests.get(f"{server.base}{path}", headers=AUTH, timeout=30).status_code == 200
    stub = grpc_stub(server.grpc_target)
    with pytest.raises(grpc.RpcError) as e:
        stub.Complete(grpc_request("def f(", 2), timeout=60)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    reply = stub.Complete(grpc_request("def f(", 2), metadata=[("authorization", f"Bearer {KEY}")], timeout=60)
    assert len(reply.token_ids) == 2


def test_record_profile_names_the_missing_key(server):
    """It printed requests' own '401 Client Error: Unauthorized for url: …'."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "MOE_CLUSTER_API_KEY"}
    for key in ((), ("--api-key", "wrong")):
        r = subprocess.run([sys.executable, "-m", "deployments.cli", "record-profile", "--url", server.base,
                            "--seconds", "0", "--out", os.devnull, *key], capture_output=True, text=True,
                           timeout=120, env=env)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert "the server needs its API key (--api-key or MOE_CLUSTER_API_KEY)" in r.stderr
        assert ("this one was refused" in r.stderr) == bool(key)


def test_body_and_header_limits(server):
    r = post(server, {"prompt": "x" * 100_000, "max_tokens": 2})
    assert r.status_code == 413 and len(r.content) < 1000
    r = requests.post(f"{server.base}/v1/completions", headers={**AUTH, "X-Junk": "a" * 200_000},
                      json={"prompt": "x", "max_tokens": 2}, timeout=60)
    assert r.status_code < 500  # refused or served, never a crash
    assert post(server, {"prompt": "def f(", "max_tokens": 2}).status_code == 200  # still serving


def test_request_timeout_releases_the_work(server):
    r = post(server, {"prompt": "def f(", "max_tokens": 500, "ignore_eos": True})
    assert r.status_code == 408 and "timed out" in r.json()["error"]["message"]
    wait_idle(server, timeout=5)  # released at once: left alone it would run ≥ 44 s more


def kv_usage(server) -> float:
    """moe_kv_cache_usage_ratio of the fullest router."""
    text = requests.get(f"{server.base}/metrics", headers=AUTH, timeout=30).text
    return max(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("moe_kv_cache_usage_ratio{"))


def cancelled(server) -> float:
    """moe_requests_total's cancelled requests, HTTP and gRPC (the service's sum, whichever replica answers)."""
    text = requests.get(f"{server.base}/metrics", headers=AUTH, timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("moe_requests_total{") and 'outcome="cancelled"' in line)


def test_client_disconnect_frees_its_kv_cache_and_counts_the_request(server):
    """A stream the client cut was counted under no outcome: 318 cut of 1260 left moe_requests_total at 945."""
    before = cancelled(server)
    body = {"prompt": "def f(", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with post(server, body, stream=True) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith(b"data: "))
        assert json.loads(first[6:])["choices"][0]["text"] is not None
        wait_for(server, lambda s: s["free_seq_slots"] == LIMITS["max_num_seqs"] - 1
                 and s["free_kv_blocks"] < s["kv_blocks"], "the stream holding KV blocks")
        assert 0 < kv_usage(server) < 1  # /metrics shows them held
    after = wait_idle(server, timeout=5)  # left the batch at once (left alone it would run ≥ 35 s more)
    assert after["free_seq_slots"] == LIMITS["max_num_seqs"] and after["free_kv_blocks"] == after["kv_blocks"]
    assert kv_usage(server) == 0
    assert post(server, {"prompt": "def f(", "max_tokens": 3}).status_code == 200
    stream = grpc_stub(server.grpc_target).Generate(grpc_request("def f(", 400), timeout=60,  # greedy: no EOS
                                                    metadata=[("authorization", f"Bearer {KEY}")])
    next(stream)
    stream.cancel()  # the gRPC client goes away mid-stream too
    wait_idle(server, timeout=5)
    deadline = time.time() + 30  # each ingress replica's figures reach the sum with its next report
    while cancelled(server) < before + 2 and time.time() < deadline:
        time.sleep(0.2)
    assert cancelled(server) == before + 2


def test_queue_limit_gives_503_and_resource_exhausted(server):
    body = {"prompt": "def f(", "max_tokens": 400, "ignore_eos": True, "stream": True}
    streams = [post(server, body, stream=True) for _ in range(3)]  # 2 running + 1 queued: the limit
    lines = [s.iter_lines() for s in streams]  # keep the readers alive: dropping one closes its stream
    try:
        for reader in lines[:2]:
            next(line for line in reader if line.startswith(b"data: "))
        busy = wait_for(server, lambda s: s["active_requests"] == 3, "2 running + 1 queued")
        r = post(server, {"prompt": "def f(", "max_tokens": 2})
        assert r.status_code == 503, (busy["active_requests"], busy["running"], busy["waiting"])
        assert r.json()["error"]["type"] == "overloaded_error"
        with pytest.raises(grpc.RpcError) as e:
            grpc_stub(server.grpc_target).Complete(grpc_request("def f(", 2), timeout=60,
                                                   metadata=[("authorization", f"Bearer {KEY}")])
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        for s in streams:
            s.close()
    wait_idle(server)


def test_drain_refuses_new_requests_and_cuts_streams_with_an_error_event(server, cluster):
    """What `moe-cluster serve` does on SIGTERM (its drain calls these on the controller): new requests
    get 503 with Retry-After and /ready turns 503; when the window is over, a stream still running
    ends with an error event and then [DONE]."""
    from ray import serve

    controller = serve.get_deployment_handle("controller", "moe")
    body = {"prompt": "def f(", "max_tokens": 400, "ignore_eos": True, "stream": True}
    try:
        with post(server, body, stream=True) as stream:
            lines = stream.iter_lines()
            next(line for line in lines if line.startswith(b"data: "))
            controller.start_drain.remote().result(timeout_s=30)
            r = _wait_status(server, 503)
            assert r.json()["error"]["type"] == "service_unavailable_error" and r.headers["Retry-After"] == "1"
            assert requests.get(f"{server.base}/ready", headers=AUTH, timeout=30).status_code == 503
            controller.cut.remote().result(timeout_s=30)
            events = [line[6:] for line in lines if line.startswith(b"data: ")]
        assert events[-1] == b"[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == 503 and "shut down" in error["message"]
    finally:
        cluster.current = None  # this deployment is drained: the next test deploys afresh


def _wait_status(server, status: int, limit_s: float = 10.0):
    deadline = time.time() + limit_s  # the ingress learns of the drain within its 0.5 s poll
    while True:
        r = post(server, {"prompt": "def f(", "max_tokens": 1})
        if r.status_code == status or time.time() > deadline:
            assert r.status_code == status, r.text
            return r
        time.sleep(0.1)
