"""`moe-cluster serve --address`: a Ray cluster the operator started (`ray start`), as a user
meets it. The public API stays on --host (127.0.0.1): its gRPC port was on every interface, as
Serve's proxy binds it, because this process's environment does not reach a raylet it did not
start. Stopping the server leaves the operator's cluster running, and another application on its
Serve with it: stopping shut Serve down, every application on it included."""
import ast
import os
import queue
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests

from tests.deployments.conftest import free_port
from tests.deployments.test_serve_cli import _listeners, _read_until_ready

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent.parent
RAY = str(Path(sys.executable).parent / "ray")


def test_serve_joins_a_cluster_it_did_not_start_and_keeps_its_api_on_the_host(tmp_path):
    import grpc

    from tests.deployments.clients import grpc_request, grpc_stub

    ray_tmp = tempfile.mkdtemp(prefix="/tmp/moe-addr-")
    port, http, grpc_port = free_port(), free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    subprocess.run([RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                    "--temp-dir", ray_tmp, "--num-cpus", "4", "--include-dashboard", "false",
                    "--disable-usage-stats", "--ray-client-server-port", str(free_port()),
                    "--dashboard-agent-listen-port", str(free_port())],
                   env=env, check=True, capture_output=True, timeout=180)
    proc = None
    serve_cmd = [sys.executable, "-m", "deployments.cli", "serve", "--address", f"127.0.0.1:{port}", "--num-workers",
                 "1", "--max-model-len", "256", "--http-port", str(http), "--grpc-port", str(grpc_port)]
    try:
        proc = subprocess.Popen(serve_cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        _stop_while_deploying(proc)  # it left the application serving on the cluster, without us
        assert _serve_actors(port, env, until=lambda names: names == []) == []

        proc, _ = _start(serve_cmd, tmp_path, env)
        r = requests.post(f"http://127.0.0.1:{http}/v1/completions", timeout=120,
                          json={"prompt": "def main(", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        reply = grpc_stub(f"127.0.0.1:{grpc_port}").Complete(grpc_request("def main(", 4), timeout=120)
        assert reply.usage.completion_tokens == 4
        api = sorted(f"{ip}:{p}" for (ip, p) in _listeners() if p in (http, grpc_port))
        assert api and all(a.startswith(("127.0.0.1:", "::ffff:127.0.0.1:")) for a in api), api
        assert {int(a.rsplit(":", 1)[1]) for a in api} == {http, grpc_port}

        _deploy_other(port, env)  # another team's application comes onto the Serve we started
        _stop(proc)
        status = subprocess.run([RAY, "status", "--address", f"127.0.0.1:{port}"], env=env, capture_output=True,
                                text=True, timeout=120)
        assert status.returncode == 0, status.stderr[-2000:]  # the operator's cluster is still up
        _other_answers(http)  # and the other application on it
        assert requests.post(f"http://127.0.0.1:{http}/v1/completions", json={"prompt": "x"},
                             timeout=30).status_code == 404  # ours is gone

        proc, lines = _start(serve_cmd, tmp_path, env)  # onto a Serve it did not start: its proxies stay
        assert any("Serve already runs on this cluster" in line for line in lines), "".join(lines[-30:])
        ready = next(line for line in lines if line.startswith("ready:"))  # the running proxies' addresses
        assert f"HTTP http://127.0.0.1:{http}/" in ready and f"gRPC 127.0.0.1:{grpc_port} " in ready, ready
        assert "metadata application: moe" in ready, ready  # two applications: Serve's proxy needs the name
        reply = grpc_stub(f"127.0.0.1:{grpc_port}").Complete(grpc_request("def main(", 4), timeout=120,
                                                             metadata=[("application", "moe")])
        assert reply.usage.completion_tokens == 4
        second = subprocess.run(serve_cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]  # serve.run would have replaced the running one
        assert "already runs an application named 'moe'" in second.stderr, second.stderr[-3000:]
        r = requests.post(f"http://127.0.0.1:{http}/v1/completions", timeout=120,
                          json={"prompt": "def main(", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        _stop(proc)
        _other_answers(http)
        with pytest.raises(grpc.RpcError):  # our application is gone from the proxy that stays
            grpc_stub(f"127.0.0.1:{grpc_port}").Complete(grpc_request("x", 1), timeout=10)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        _stop_cluster(ray_tmp)


def _start(serve_cmd: list[str], cwd, env: dict):
    proc = subprocess.Popen(serve_cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = _read_until_ready(proc)
    assert any(line.startswith("ready:") for line in lines), "".join(lines[-30:])
    return proc, lines


def _stop(proc) -> None:
    proc.send_signal(signal.SIGINT)
    code, rest = proc.wait(timeout=180), []
    while True:  # the rest of its output (read by _read_until_ready's thread)
        try:
            rest.append(proc.lines.get(timeout=1))
        except queue.Empty:
            break
    assert code == 0, "".join(rest[-30:])


def _stop_while_deploying(proc) -> None:
    """SIGTERM once Serve deploys the application (its replicas take seconds to load the model). After
    ray.init, Ray's own SIGTERM handler (sys.exit) was in place: exit 15 and the application left behind."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "Deploying new version of Deployment" in line:
            break
    assert seen and "Deploying new version" in seen[-1], "".join(seen[-30:])
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=180)[0]
    # 130: stopped before ready (0 only if the application got ready first: the drain path, clean too)
    assert proc.returncode in (130, 0), "".join(seen[-10:]) + rest[-3000:]
    print(f"\nSIGTERM while deploying: exit {proc.returncode}")


def _serve_actors(port: int, env: dict, until) -> list[str]:
    """The named actors Serve has on the cluster (controller, proxies, replicas), once `until` holds of
    them (a minute at most: actors that are stopping are listed until they are gone)."""
    code = ("import ray; ray.init(address='127.0.0.1:%d', log_to_driver=False); "
            "print([a['name'] for a in ray.util.list_named_actors(all_namespaces=True)])" % port)
    deadline = time.monotonic() + 60
    while True:
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        names = [name for name in ast.literal_eval(r.stdout.strip().splitlines()[-1]) if "SERVE" in name]
        if until(names) or time.monotonic() > deadline:
            return names
        time.sleep(1)


OTHER_APP = """
import ray
from ray import serve

ray.init(address="127.0.0.1:%d", log_to_driver=False)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Other:
    def __call__(self, request):
        return "other"


serve.run(Other.bind(), name="other", route_prefix="/other")
"""


def _deploy_other(port: int, env: dict) -> None:
    r = subprocess.run([sys.executable, "-c", OTHER_APP % port], env=env, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]


def _other_answers(http: int) -> None:
    r = requests.get(f"http://127.0.0.1:{http}/other", timeout=30)
    assert r.status_code == 200 and r.text == "other", (r.status_code, r.text[:200])


def _stop_cluster(ray_tmp: str) -> None:
    """`ray stop` would stop every Ray cluster on the machine: only the processes of this one's temp dir."""
    import psutil

    ours = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(ray_tmp in part for part in p.info["cmdline"] or ()):
                ours.append(p)
        except psutil.Error:
            pass
    for p in ours:
        p.terminate()
    _, alive = psutil.wait_procs(ours, timeout=30)
    for p in alive:
        p.kill()
