"""A one-machine Ray cluster whose every port listens on the configured host only.

Ray's own switch for a local-only cluster is RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0:
with it and node IP 127.0.0.1, the GCS, raylet, object manager, agents and
every worker's gRPC server bind to 127.0.0.1 (otherwise Ray rewrites the node IP
to the machine's address and binds most of them to all interfaces). Two Serve
servers hard-code `[::]` (the gRPC proxy, and each replica's server for calls
between deployments); `bind_serve_to_host`, installed as Ray's
worker_process_setup_hook, points both at MOE_CLUSTER_BIND_HOST instead.
The public gRPC API takes no message larger than the HTTP body limit.
"""
from __future__ import annotations

import math
import os

from deployments.edge import HAPROXY_ENV, bind_haproxy_to_host, haproxy_env

BIND_HOST_ENV = "MOE_CLUSTER_BIND_HOST"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def bind_serve_to_host() -> None:
    """Ray worker_process_setup_hook: runs in every Ray worker process (controller, proxy, replicas)."""
    host = os.environ.get(BIND_HOST_ENV)
    if not host:
        return
    from ray.serve._private import default_impl, replica

    add_grpc_address, add_port = default_impl.add_grpc_address, replica.add_port_to_grpc_server

    def grpc_proxy_address(server, address: str):
        return add_grpc_address(server, address.replace("[::]", host, 1))

    def replica_port(server, address: str):
        return add_port(server, address.replace("[::]", host, 1))

    default_impl.add_grpc_address = grpc_proxy_address
    replica.add_port_to_grpc_server = replica_port
    if os.environ.get(HAPROXY_ENV) == "1":
        bind_haproxy_to_host(host)


def local_env(host: str, max_message_bytes: int) -> dict[str, str]:
    """Environment for a local start (inherited by every Ray process it starts)."""
    env = {BIND_HOST_ENV: host, "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE": str(max_message_bytes), **haproxy_env(host)}
    if host in LOOPBACK:
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keep Ray's node IP (and its ports) on loopback
    return env


def start_local_ray(host: str, num_cpus: float, max_message_bytes: int, **init_kwargs) -> None:
    import ray

    os.environ.update(local_env(host, max_message_bytes))
    node_ip = "127.0.0.1" if host in LOOPBACK else host
    ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(num_cpus)), include_dashboard=False,
             _node_ip_address=node_ip,
             runtime_env={"worker_process_setup_hook": "deployments.local.bind_serve_to_host"}, **init_kwargs)
