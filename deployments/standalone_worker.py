"""An expert worker without Ray: one process serving the data plane for some experts.

    MOE_CLUSTER_DATA_PLANE_SECRET=... python -m deployments.standalone_worker MODEL '[[layer, expert_id], ...]' \
        [NAME] [--service-time-per-token S] [--device cpu|cuda] [--dtype auto|float32|bfloat16|float16]

Prints its endpoints as one JSON line, `{"port": ..., "local_socket": ..., "device": ...}`
(gRPC on 127.0.0.1:port; the same-node transports' Unix socket), then serves until
killed. Used by the benchmarks and the data-plane tests (`start` and `worker_ref` below). The secret
is required.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading

from cluster.placement import WorkerRef
from deployments.experts.auth import ENV
from deployments.experts.host import ExpertHost, WorkerSpec


def start(model: str, experts, *extra: str, secret: str) -> subprocess.Popen:
    """A worker process holding copies of `experts` ([(layer, expert_id), ...]); the caller kills it.
    `extra`: the name and options, as on the command line."""
    return subprocess.Popen([sys.executable, "-m", "deployments.standalone_worker", model,
                             json.dumps([list(e) for e in experts]), *extra],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, ENV: secret})


def worker_ref(proc: subprocess.Popen, node: str) -> WorkerRef:
    """What a started worker printed, as the controller would put it in the table (waits until it serves)."""
    e = json.loads(proc.stdout.readline())
    return WorkerRef(f"127.0.0.1:{e['port']}", node, local_socket=e["local_socket"], device=e["device"])


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("experts", help="JSON list of [layer, expert_id]")
    p.add_argument("name", nargs="?", default="worker")
    p.add_argument("--service-time-per-token", type=float, default=0.0,
                   help="model a device of fixed capacity (seconds per row; benchmarks and fault tests)")
    p.add_argument("--device", default="cpu", help="where the experts compute: cpu or cuda")
    p.add_argument("--dtype", default="auto",
                   help="weights and compute (auto: the checkpoint's dtype on a GPU, float32 on a CPU)")
    return p.parse_args()


def main() -> None:
    args = _args()
    secret = os.environ.get(ENV)
    if not secret:
        sys.exit(f"set {ENV}: the data plane refuses callers without the shared secret")
    experts = tuple(tuple(e) for e in json.loads(args.experts))
    host = ExpertHost(WorkerSpec(model=args.model, secret=secret, experts=experts, name=args.name, device=args.device,
                                 dtype=args.dtype, service_time_per_token_s=args.service_time_per_token))
    print(json.dumps({"port": host.port, "local_socket": host.local.path, "device": host.device}), flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
