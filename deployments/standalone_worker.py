"""An expert worker without Ray: one process serving the data plane for some experts.

    MOE_CLUSTER_DATA_PLANE_SECRET=... python -m deployments.standalone_worker MODEL '[[layer, expert_id], ...]' \
        [NAME] [--service-time-per-token S]

Prints the port it listens on (127.0.0.1), then serves until killed. Used by
bench/data_plane_bench.py and the data-plane tests. The secret is required.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading

import torch

from cluster.loader import load_experts, open_model
from cluster.model.experts import LocalExperts
from deployments.experts.auth import ENV
from deployments.experts.servicer import ExpertServicer
from deployments.experts.transport.grpc import serve


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("experts", help="JSON list of [layer, expert_id]")
    p.add_argument("name", nargs="?", default="worker")
    p.add_argument("--service-time-per-token", type=float, default=0.0,
                   help="model a device of fixed capacity (seconds per row; benchmarks and fault tests)")
    args = p.parse_args()
    secret = os.environ.get(ENV)
    if not secret:
        sys.exit(f"set {ENV}: the data plane refuses callers without the shared secret")
    experts = [tuple(e) for e in json.loads(args.experts)]
    torch.set_num_threads(1)
    ckpt, family, cfg = open_model(args.model)
    held = LocalExperts(load_experts(ckpt, family, cfg, experts))

    def load_copies(wanted):
        before = ckpt.bytes_read
        held.add(load_experts(ckpt, family, cfg, wanted))
        return ckpt.bytes_read - before

    servicer = ExpertServicer(args.name, cfg, held, "cpu", args.service_time_per_token, load_copies)
    _, port = serve(servicer, "127.0.0.1", secret)
    print(port, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
