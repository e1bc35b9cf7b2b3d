"""A real Ray instance and Serve (HTTP + gRPC on 127.0.0.1) shared by the serving tests."""
import json
import shutil
import subprocess
import tempfile
import time

import pytest

from deployments import edge
from tests.deployments.helpers import KINDS, start_worker


GRPC_SERVICERS = ["protos.moe_serving_pb2_grpc.add_MoeServingServicer_to_server",
                  "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"]


def free_port() -> int:
    """Free now, and out of the ranges Ray's and our own servers take before HAProxy binds it."""
    return edge.spare_port("127.0.0.1")


class Cluster:
    def __init__(self, http_port: int, grpc_port: int):
        self.http_port, self.grpc_port = http_port, grpc_port
        self.base = f"http://127.0.0.1:{http_port}"
        self.grpc_target = f"127.0.0.1:{grpc_port}"
        self.current = None

    def deploy(self, model: str, num_workers: int, **extra) -> "Cluster":
        from ray import serve

        from deployments.app import build_app
        from deployments.config import app_config

        args = {**dict(model=model, num_workers=num_workers, routers={"num_cpus": 0.5}, max_num_seqs=16,
                       max_model_len=512, worker={"num_cpus": 0.25, "torch_threads": 1}), **extra}
        key = json.dumps(args, sort_keys=True)
        if key != self.current:
            cfg = app_config(args)
            serve.run(build_app(cfg), name="moe", route_prefix="/")
            self.current = key
            self._wait_ready(cfg)
        return self

    def _wait_ready(self, cfg, limit_s: float = 120) -> None:
        """Serve says RUNNING before the routers' first reports reach the controller and the ingress:
        wait (bounded) until /ready is 200 and every router is listed, so no test reads stale state."""
        import requests

        headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            try:
                ready = requests.get(f"{self.base}/ready", headers=headers, timeout=10).status_code == 200
                stats = requests.get(f"{self.base}/admin/stats", headers=headers, timeout=10).json()
                if ready and len(stats.get("routers", {})) >= cfg.routers.min:
                    return
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"the application was not ready within {limit_s} s")


@pytest.fixture(scope="session")
def cluster():
    ray = pytest.importorskip("ray")
    from ray import serve

    from deployments.local import start_local_ray

    temp_dir = tempfile.mkdtemp(prefix="/tmp/moe-ray-")  # short: Ray's socket paths must stay < 108 chars
    # As `moe-cluster serve` starts it: every port, Ray's included, on 127.0.0.1.
    start_local_ray("127.0.0.1", 8, 1 << 20, _temp_dir=temp_dir, log_to_driver=False)
    c = Cluster(free_port(), free_port())
    serve.start(http_options={"host": "127.0.0.1", "port": c.http_port},
                grpc_options={"port": c.grpc_port, "grpc_servicer_functions": GRPC_SERVICERS})
    try:
        yield c
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def workers(checkpoint_factory):
    """Start standalone worker processes for given expert lists; returns the processes; killed at the end."""
    procs = []

    def start(model: str, expert_lists, *extra: str) -> list[subprocess.Popen]:
        procs.extend(start_worker(model, experts, *extra) for experts in expert_lists)
        return procs[-len(expert_lists):]

    yield start
    for p in procs:
        p.kill()
        p.wait()


@pytest.fixture(params=sorted(KINDS))
def kind(request) -> str:
    return request.param
