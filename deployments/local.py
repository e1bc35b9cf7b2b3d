"""A one-machine Ray cluster whose every port listens on the configured host only.

`--host 127.0.0.1` (the default): Ray's own switch for a local-only cluster,
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, keeps the node IP at 127.0.0.1; with that
node IP the GCS, raylet, object manager, dashboard and runtime-env agents and
every worker's gRPC server bind to 127.0.0.1. (Without it Ray rewrites 127.0.0.1
to the machine's address and binds those servers to all interfaces, the agents
to the machine's address.) Two Serve servers hard-code `[::]` (the gRPC proxy, and
each replica's server for calls between deployments); `bind_serve_to_host`,
installed as Ray's worker_process_setup_hook, points both at MOE_CLUSTER_BIND_HOST.
`--host 0.0.0.0`: every interface, as Ray binds a multi-node cluster. Ray can bind
its own servers to loopback or to every interface only, so no other host is
accepted for a local start.
The public gRPC API takes no message larger than the HTTP body limit.
"""
from __future__ import annotations

import atexit
import math
import os
import shutil
import signal
from contextlib import contextmanager

from deployments.edge import HAPROXY_ENV, bind_haproxy_to_host, haproxy_dies_with_its_manager, haproxy_env

BIND_HOST_ENV = "MOE_CLUSTER_BIND_HOST"
API_HOST_ENV = "MOE_CLUSTER_API_HOST"
SETUP_HOOK = "deployments.local.bind_serve_to_host"
LOOPBACK = "127.0.0.1"
EVERY_INTERFACE = "0.0.0.0"
_ALIASES = {"localhost": LOOPBACK}


def local_host(host: str) -> str:
    """The --host of a local start, checked: 127.0.0.1 (or localhost) or 0.0.0.0."""
    host = _ALIASES.get(host, host)
    if host not in (LOOPBACK, EVERY_INTERFACE):
        raise ValueError(f"--host {host}: a local start binds Ray's own servers (GCS, raylet, every worker) "
                         f"to loopback or to every interface only; use {LOOPBACK} (the default) or "
                         f"{EVERY_INTERFACE} behind a firewall, or start Ray yourself and pass --address")
    return host


def bind_serve_to_host() -> None:
    """Ray worker_process_setup_hook: runs in every Ray worker process (controller, proxy, replicas).
    API_HOST_ENV: the public gRPC API and HAProxy's own ports (a local start and --address alike);
    BIND_HOST_ENV: also each replica's server for calls between deployments (a local start only: on
    a cluster, replicas on other nodes call it)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # blocked in the raylet: see group_sigterm_left_to_us
    exclusive_grpc_ports()
    api_host, replica_host = os.environ.get(API_HOST_ENV), os.environ.get(BIND_HOST_ENV)
    if not (api_host or replica_host):
        return
    from ray.serve._private import default_impl, replica

    add_grpc_address, add_port = default_impl.add_grpc_address, replica.add_port_to_grpc_server

    def grpc_proxy_address(server, address: str):
        return add_grpc_address(server, address.replace("[::]", api_host, 1))

    def replica_port(server, address: str):
        return add_port(server, address.replace("[::]", replica_host, 1))

    if api_host:
        default_impl.add_grpc_address = grpc_proxy_address
        if os.environ.get(HAPROXY_ENV) == "1":
            bind_haproxy_to_host(api_host)
            haproxy_dies_with_its_manager()
    if replica_host:
        replica.add_port_to_grpc_server = replica_port


def exclusive_grpc_ports() -> None:
    """Serve 2.60 turns SO_REUSEPORT off for its replicas' gRPC servers with the string "0", which gRPC
    ignores (it reads an integer): it stays on. Every Serve counts its direct-ingress gRPC ports from 40000,
    so a second one on the machine (another server, a test's cluster) bound the same port and the kernel
    split connections between the two: a request reached the other server (there: "wrong API key").
    As an integer the second bind fails and Serve takes the next port."""
    from ray.serve._private import grpc_util

    init = grpc_util.gRPCGenericServer.__init__
    if getattr(init, "exclusive_ports", False):
        return

    def with_integer_options(self, service_handler_factory, *, extra_options=None):
        options = [(k, int(v) if k == "grpc.so_reuseport" else v) for k, v in extra_options or ()]
        init(self, service_handler_factory, extra_options=options)

    with_integer_options.exclusive_ports = True
    grpc_util.gRPCGenericServer.__init__ = with_integer_options


def _remove_after_ray(folder: str) -> None:
    """At exit: Ray registered its own shutdown when it was imported, so it would run after this
    one (atexit is last in, first out) and its HAProxy would lose its files while still up."""
    import ray

    ray.shutdown()  # a no-op when already down
    shutil.rmtree(folder, ignore_errors=True)


def api_env(host: str, max_message_bytes: int) -> dict[str, str]:
    """What Serve's gRPC proxy needs from us, on a local start or a cluster we join."""
    return {API_HOST_ENV: host, "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE": str(max_message_bytes)}


def join_ray(address: str, host: str, max_message_bytes: int) -> None:
    """An existing cluster (--address): Ray's own ports are the cluster's business (its operator chose
    them when starting it); the public gRPC API binds to `host` as the HTTP API does, on every node's
    proxy. The variables reach Serve's proxies and replicas through the job's runtime environment:
    this process's environment does not reach a raylet it did not start."""
    import ray

    ray.init(address=address, runtime_env={"worker_process_setup_hook": SETUP_HOOK,
                                           "env_vars": api_env(host, max_message_bytes)})


def local_env(host: str, max_message_bytes: int) -> dict[str, str]:
    """Environment for a local start (inherited by every Ray process it starts)."""
    env = {BIND_HOST_ENV: host, **api_env(host, max_message_bytes), **haproxy_env(host)}
    if host == LOOPBACK:
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keep Ray's node IP (and its ports) on loopback
    return env


@contextmanager
def group_sigterm_left_to_us():
    """Ray's processes started in here (GCS, raylet; they inherit this thread's signal mask) ignore
    SIGTERM, as Ray makes them ignore SIGINT: a signal to the whole process group (`timeout`, systemd's
    KillMode=control-group, a shell's kill -- -PGID) then reaches only this process, which drains and
    stops them in order. Before, it killed the GCS and raylet under a draining server: it waited 60 s
    for the GCS and left HAProxy listening on the ports. They still stop by SIGKILL, as Ray's own
    shutdown sends after a second of SIGTERM; their workers get SIGTERM back (`bind_serve_to_host`)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def start_local_ray(host: str, num_cpus: float, max_message_bytes: int, **init_kwargs) -> None:
    import ray
    from ray._private import ray_constants

    host = local_host(host)
    env = local_env(host, max_message_bytes)
    os.environ.update(env)
    if "RAY_SERVE_HAPROXY_SERVER_STATE_BASE" in env:  # this start's HAProxy files go when the process does
        atexit.register(_remove_after_ray, env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"])
    # Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when it is imported, and this process
    # (the CLI, pytest) imported it before: without this, ray.init rewrites the node IP
    # 127.0.0.1 to the machine's address and Ray's ports face every interface.
    ray_constants.ENABLE_RAY_CLUSTER = host != LOOPBACK
    with group_sigterm_left_to_us():
        ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(num_cpus)), include_dashboard=False,
                 _node_ip_address=host if host == LOOPBACK else None,
                 runtime_env={"worker_process_setup_hook": SETUP_HOOK}, **init_kwargs)
    # Ray's processes have inherited this start's HAProxy files and ports; a later start, or another
    # cluster this process launches (a test's subprocess), must not reuse them.
    for key in env:
        if key.startswith("RAY_SERVE_HAPROXY_") or key == HAPROXY_ENV:
            os.environ.pop(key, None)
