"""`moe-cluster serve` as the README runs it: starts, answers, stops cleanly on SIGTERM (as on Ctrl-C)."""
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import requests

from deployments import start_checks
from tests.deployments.conftest import free_port
from tests.helpers import DEMO

pytestmark = pytest.mark.slow
ROOT = DEMO.parent.parent


KEY = "cli-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _config(tmp_path) -> str:
    """The bundled config with every engine step ≥ 50 ms (the 200-token stream lasts ≥ 10 s, so it is
    surely in flight at SIGTERM, however fast the machine) and a drain window it surely fits in."""
    import yaml

    conf = yaml.safe_load((ROOT / "deployments" / "serve_local.yaml").read_text())
    conf["applications"][0]["args"].update(engine_step_delay_s=0.05, drain_timeout_s=120)
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(conf))
    return str(path)


def _read_until_ready(proc, limit_s: float = 240) -> list[str]:
    """The server's output up to its `ready:` line, read on a thread so a silent hang cannot block us."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen, deadline = [], time.time() + limit_s
    while time.time() < deadline and proc.poll() is None:
        try:
            seen.append(lines.get(timeout=1))
        except queue.Empty:
            continue
        if seen[-1].startswith("ready:"):
            break
    proc.lines = lines
    return seen


def test_serve_starts_answers_and_stops(tmp_path):
    http, grpc_port = free_port(), free_port()
    ray_tmp = tempfile.mkdtemp(prefix="/tmp/moe-cli-")  # unique: tells this server's Ray processes from others'
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "MOE_CLUSTER_API_KEY": KEY}
    before, started = _listeners(), time.time()
    # run from another directory: the config's relative paths (models/demo, its policy file) still resolve
    proc = subprocess.Popen([sys.executable, "-m", "deployments.cli", "serve", "--num-workers", "1", "--max-model-len",
                             "512", "--config", _config(tmp_path), "--http-port", str(http), "--grpc-port",
                             str(grpc_port)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # its own process group, as a shell's job has
    try:
        lines = _read_until_ready(proc)
        assert any(line.startswith("ready:") for line in lines), "".join(lines[-30:])
        r = requests.post(f"http://127.0.0.1:{http}/v1/completions", timeout=120, headers=AUTH,
                          json={"model": "demo", "prompt": "def main(", "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
        card = requests.get(f"http://127.0.0.1:{http}/v1/models", timeout=60, headers=AUTH).json()["data"][0]
        assert card["max_model_len"] == 512
        bad = requests.post(f"http://127.0.0.1:{http}/v1/completions", timeout=120, headers=AUTH,
                            json={"model": "demo", "prompt": "x", "max_tokens": 0})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
        _grpc_bad_request(grpc_port)
        _key_guards_everything_but_liveness(http, grpc_port)
        _every_new_listener_on_loopback(before, started, ray_tmp, {http, grpc_port})
        drained = _sigterm_while_streaming(proc, f"http://127.0.0.1:{http}")
        assert proc.wait(timeout=240) == 0
        out = "".join(_drained(proc.lines))
        in_flight = re.search(r"draining (\d+) in-flight request", out)
        assert in_flight and int(in_flight.group(1)) >= 1, out[-3000:]  # at least the stream
        assert drained["finish_reason"] == "length" and drained["tokens"] == 200  # the stream finished
        assert drained["refused"] == 503 and drained["ready"] == 503  # new requests were turned away
        _serve_stopped_in_its_own_time(out, ray_tmp)
        _console_is_readable(out)
        start_checks.check_ports_free("127.0.0.1", {"--http-port": http, "--grpc-port": grpc_port})  # HAProxy went
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _sigterm_while_streaming(proc, base: str) -> dict:
    """SIGTERM once a long stream is under way; then a new request must get 503 while the
    stream runs on to its end (the drain window). The signal goes to the whole process group, as
    `timeout` and systemd send it: it killed Ray's GCS and raylet under the draining server, which
    then waited 60 s for the GCS and left HAProxy listening on the ports."""
    result: dict = {"tokens": 0, "finish_reason": None}
    started = threading.Event()

    def stream():
        body = {"prompt": "def main(", "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True}
        with requests.post(f"{base}/v1/completions", json=body, stream=True, timeout=120, headers=AUTH) as r:
            for line in r.iter_lines():
                if line.startswith(b"data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    result["tokens"] += 1
                    result["finish_reason"] = choice["finish_reason"] or result["finish_reason"]
                    started.set()

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    assert started.wait(60)
    os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.time() + 30
    while time.time() < deadline and "refused" not in result:
        r = requests.post(f"{base}/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=30, headers=AUTH)
        if r.status_code != 200:
            result["refused"] = r.status_code
            result["ready"] = requests.get(f"{base}/ready", timeout=30, headers=AUTH).status_code
        time.sleep(0.05)
    t.join(timeout=120)
    return result


def _serve_stopped_in_its_own_time(out: str, ray_tmp: str) -> None:
    """After our drain, Serve stopped every replica within the time it gives itself: serve.shutdown() did not
    give up on its controller, and the controller forced no shutdown tier (an ingress replica held open 30 s
    for a load balancer already gone did both, deployments.app.INGRESS_DEREGISTRATION_S)."""
    assert "failed to shut down" not in out, out[-3000:]
    logs = list(Path(ray_tmp).glob("ray/session_*/logs/serve/controller_*.log"))
    assert logs, f"no Serve controller log under {ray_tmp}"
    forced = [line for log in logs for line in log.read_text().splitlines() if "did not drain within" in line]
    assert forced == [], forced


def _grpc_bad_request(grpc_port: int) -> None:
    import grpc

    from tests.deployments.clients import grpc_request, grpc_stub

    with pytest.raises(grpc.RpcError) as e:
        grpc_stub(f"127.0.0.1:{grpc_port}").Complete(grpc_request("x", 0), metadata=(("x-api-key", KEY),), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_tokens" in e.value.details()


def _console_is_readable(out: str) -> None:
    """The 400s above (HTTP and gRPC) are the client's fault: no "Request failed" traceback for them.
    The controller's reports (two a second per replica) are not access-logged line by line."""
    assert "Request failed" not in out, [line for line in out.splitlines() if "Request failed" in line][:3]
    assert "CALL report" not in out and "CALL ingress_report" not in out


def _drained(lines: queue.Queue) -> list[str]:
    out = []
    while True:
        try:
            out.append(lines.get(timeout=2))
        except queue.Empty:
            return out


def _key_guards_everything_but_liveness(http: int, grpc_port: int) -> None:
    """With a key: docs, schema and gRPC reflection are off; liveness (HTTP and grpc.health.v1) is open."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    base = f"http://127.0.0.1:{http}"
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert requests.get(base + path, timeout=30).status_code in (401, 404)
        assert requests.get(base + path, timeout=30, headers=AUTH).status_code == 404  # off, not just guarded
    assert requests.get(base + "/v1/models", timeout=30).status_code == 401
    assert requests.get(base + "/health", timeout=30).status_code == 200
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    deadline = time.time() + 30  # readiness arrives with the routers' first reports
    while True:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        if reply.status == health_pb2.HealthCheckResponse.SERVING or time.time() > deadline:
            break
        time.sleep(0.2)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    with pytest.raises(grpc.RpcError) as e:
        list(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                          timeout=30))
    assert e.value.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAUTHENTICATED,
                              grpc.StatusCode.NOT_FOUND)


def _listeners() -> dict[tuple[str, int], int | None]:
    """Every listening TCP socket on the machine (IPv4 and IPv6) → the pid that owns it."""
    import psutil

    return {(c.laddr.ip, c.laddr.port): c.pid for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN}


def _of_this_server(pid: int | None, started: float, ray_tmp: str) -> str | None:
    """`name cmdline` of a process started after `started` in this server's Ray session (its command
    line, an open file or RAY_TMPDIR names the session's temp dir); None for anyone else's."""
    import psutil

    if pid is None:  # another user's socket: not ours
        return None
    inside = ray_tmp + os.sep
    try:
        p = psutil.Process(pid)
        if p.create_time() < started - 1:
            return None
        cmdline = " ".join(p.cmdline())
        if (inside in cmdline or p.environ().get("RAY_TMPDIR") == ray_tmp
                or any(f.path.startswith(inside) for f in p.open_files())
                or _of_this_server(p.ppid(), started, ray_tmp)):  # e.g. haproxy, a child of Serve's manager
            return f"{p.name()} {cmdline[:80]}"
    except psutil.Error:  # gone meanwhile
        pass
    return None


def _every_new_listener_on_loopback(before: dict, started: float, ray_tmp: str, api_ports: set[int]) -> None:
    """Machine-wide, not the server's process tree: Ray's agents and workers are started by the raylet.
    Listeners of neighbours (other servers on this machine) are told apart by the session's temp dir."""
    ours = {}
    for (ip, port), pid in _listeners().items():
        who = None if (ip, port) in before else _of_this_server(pid, started, ray_tmp)
        if who:
            ours[(ip, port)] = who
    off = [f"{ip}:{port} {who}" for (ip, port), who in ours.items() if ip not in ("127.0.0.1", "::ffff:127.0.0.1")]
    assert off == [], "listening off 127.0.0.1:\n" + "\n".join(off)
    seen = " | ".join(ours.values())
    assert api_ports <= {port for _, port in ours}, seen  # the check saw this server's API ports ...
    for ray_process in ("gcs_server", "raylet", "DashboardAgent", "RuntimeEnvAgent", "ServeReplica", "haproxy"):
        assert ray_process in seen, seen  # ... and Ray's own, agents included


@pytest.mark.parametrize("args, says", [
    ("{num_workers: -1}", "num_workers: Input should be greater than or equal to 0"),
    # a cache short of one max_model_len sequence would refuse every request that leaves max_tokens out
    ("{kv_cache_memory_bytes: 100000}", "kv_cache_memory_bytes=100000 holds 16 tokens of this model's KV cache "
                                        "(float32), less than one sequence of max_model_len=1024: raise "
                                        "kv_cache_memory_bytes to at least 4194304 or lower max_model_len to at most 16"),
])
def test_bad_config_is_one_clear_line(tmp_path, args, says):
    bad = tmp_path / "serve.yaml"
    bad.write_text("applications:\n  - name: moe\n    import_path: deployments.app:app_builder\n"
                   f"    args: {args}\n")
    r = subprocess.run([sys.executable, "-m", "deployments.cli", "serve", "--config", str(bad)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert says in r.stderr and "Traceback" not in r.stderr
    assert "Ray" not in r.stderr  # refused before a cluster was started for it
