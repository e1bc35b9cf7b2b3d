"""`moe-cluster serve --address`: a Ray cluster the operator started (`ray start`), as a user
meets it. The public API stays on --host (127.0.0.1): its gRPC port was on every interface, as
Serve's proxy binds it, because this process's environment does not reach a raylet it did not
start. Stopping the server leaves the operator's cluster running."""
import ast
import os
import signal
import subprocess
import sys
import tempfile
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
        _ctrl_c_while_deploying(proc)  # it left the application serving on the cluster, without us
        assert _serve_actors(port, env) == []

        proc = subprocess.Popen(serve_cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        lines = _read_until_ready(proc)
        assert any(line.startswith("ready:") for line in lines), "".join(lines[-30:])
        r = requests.post(f"http://127.0.0.1:{http}/v1/completions", timeout=120,
                          json={"prompt": "def main(", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        reply = grpc_stub(f"127.0.0.1:{grpc_port}").Complete(grpc_request("def main(", 4), timeout=120)
        assert reply.usage.completion_tokens == 4
        api = sorted(f"{ip}:{p}" for (ip, p) in _listeners() if p in (http, grpc_port))
        assert api and all(a.startswith(("127.0.0.1:", "::ffff:127.0.0.1:")) for a in api), api
        assert {int(a.rsplit(":", 1)[1]) for a in api} == {http, grpc_port}

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=180) == 0
        status = subprocess.run([RAY, "status", "--address", f"127.0.0.1:{port}"], env=env, capture_output=True,
                                text=True, timeout=120)
        assert status.returncode == 0, status.stderr[-2000:]  # the operator's cluster is still up
        with pytest.raises(grpc.RpcError):  # and our server is gone from it
            grpc_stub(f"127.0.0.1:{grpc_port}").Complete(grpc_request("x", 1), timeout=10)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        _stop_cluster(ray_tmp)


def _ctrl_c_while_deploying(proc) -> None:
    """SIGINT once Serve deploys the application (its replicas take seconds to load the model)."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "Deploying new version of Deployment" in line:
            break
    assert seen and "Deploying new version" in seen[-1], "".join(seen[-30:])
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=180)[0]
    # 130: stopped before ready (0 only if the application got ready first: the drain path, clean too)
    assert proc.returncode in (130, 0), "".join(seen[-10:]) + rest[-3000:]
    print(f"\nCtrl-C while deploying: exit {proc.returncode}")


def _serve_actors(port: int, env: dict) -> list[str]:
    """The named actors Serve leaves on the cluster (controller, proxies, replicas)."""
    code = ("import ray; ray.init(address='127.0.0.1:%d', log_to_driver=False); "
            "print([a['name'] for a in ray.util.list_named_actors(all_namespaces=True)])" % port)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return [name for name in ast.literal_eval(r.stdout.strip().splitlines()[-1]) if "SERVE" in name]


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
