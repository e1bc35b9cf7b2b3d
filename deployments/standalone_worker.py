"""An expert worker without Ray: one process serving the gRPC data plane for some slots.

    python -m deployments.standalone_worker MODEL '[[layer, expert_id], ...]' [NAME]

Prints the port it listens on (127.0.0.1), then serves until killed. Used by
bench/data_plane_bench.py and the data-plane fault tests.
"""
from __future__ import annotations

import json
import sys
import threading

import torch

from cluster.loader import load_experts, open_model
from cluster.model.experts import LocalExperts
from deployments.data_plane import ExpertServicer, start_server


def main() -> None:
    model, slots = sys.argv[1], [tuple(s) for s in json.loads(sys.argv[2])]
    name = sys.argv[3] if len(sys.argv) > 3 else "worker"
    torch.set_num_threads(1)
    ckpt, family, cfg = open_model(model)
    server, port = start_server(ExpertServicer(name, LocalExperts(load_experts(ckpt, family, cfg, slots)), "cpu"),
                                "127.0.0.1")
    print(port, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
