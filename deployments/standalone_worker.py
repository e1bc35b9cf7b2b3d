"""An expert worker without Ray: one process serving the gRPC data plane for some slots.

    python -m deployments.standalone_worker MODEL '[[layer, expert_id], ...]' [NAME] [--service-time-per-token S]

Prints the port it listens on (127.0.0.1), then serves until killed. Used by
bench/data_plane_bench.py and the data-plane fault tests.
"""
from __future__ import annotations

import argparse
import json
import threading

import torch

from cluster.loader import load_experts, open_model
from cluster.model.experts import LocalExperts
from deployments.data_plane import ExpertServicer, start_server


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("slots", help="JSON list of [layer, expert_id]")
    p.add_argument("name", nargs="?", default="worker")
    p.add_argument("--service-time-per-token", type=float, default=0.0,
                   help="model a device of fixed capacity (seconds per row; benchmarks and fault tests)")
    args = p.parse_args()
    slots = [tuple(s) for s in json.loads(args.slots)]
    torch.set_num_threads(1)
    ckpt, family, cfg = open_model(args.model)
    experts = LocalExperts(load_experts(ckpt, family, cfg, slots))
    def load(wanted):
        before = ckpt.bytes_read
        experts.add(load_experts(ckpt, family, cfg, wanted))
        return ckpt.bytes_read - before

    servicer = ExpertServicer(args.name, experts, "cpu", args.service_time_per_token, load)
    server, port = start_server(servicer, "127.0.0.1")
    print(port, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
