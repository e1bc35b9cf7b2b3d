"""Latency of one expert call: in the router's process, over gRPC to a worker on the router's
own Ray node, and over gRPC to a worker on another Ray node (a two-node Ray cluster on this
machine, both nodes on 127.0.0.1). One run, same slots, same rows.

    .venv/bin/python bench/expert_call_latency.py [--model models/demo] [--rows 1,16,64] [--calls 200]

On one machine "another node" is a second raylet reached over loopback, so the two gRPC
figures bound the cost of our transport itself; across real hosts add the network's RTT.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # the second local node joins without a shared token
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on 127.0.0.1

import grpc  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from cluster.loader import load_experts, open_model  # noqa: E402
from cluster.model.experts import LocalExperts  # noqa: E402
from deployments.data_plane import CHANNEL_OPTIONS, ExpertServicer, start_server, to_proto  # noqa: E402
from protos import expert_pb2, expert_pb2_grpc  # noqa: E402


@ray.remote(num_cpus=0.5)
class WorkerOnNode:
    def __init__(self, model: str, slots: list[tuple[int, int]]):
        torch.set_num_threads(1)
        ckpt, family, cfg = open_model(model)
        self.server, port = start_server(ExpertServicer("bench", LocalExperts(load_experts(ckpt, family, cfg, slots)),
                                                        "cpu"), "127.0.0.1")
        self.address = f"127.0.0.1:{port}"

    def where(self) -> tuple[str, str]:
        return self.address, ray.get_runtime_context().get_node_id()


def p50_p99_ms(samples: list[float]) -> tuple[float, float]:
    s = sorted(samples)
    return round(1000 * statistics.median(s), 3), round(1000 * s[int(0.99 * (len(s) - 1))], 3)


def time_calls(fn, calls: int) -> tuple[float, float]:
    for _ in range(10):
        fn()
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return p50_p99_ms(samples)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/demo")
    p.add_argument("--rows", default="1,16,64", help="rows (token-expert pairs) per call")
    p.add_argument("--calls", type=int, default=200)
    args = p.parse_args()
    torch.set_num_threads(1)
    ckpt, family, cfg = open_model(args.model)
    layer = cfg.moe_layer_ids[0]
    slots = [(layer, 0), (layer, 1)]
    local = LocalExperts(load_experts(ckpt, family, cfg, slots))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "node_ip_address": "127.0.0.1",
                                                            "labels": {"role": "router"}})
    cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1", labels={"role": "experts"})
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        here = ray.get_runtime_context().get_node_id()
        actors = {role: WorkerOnNode.options(label_selector={"role": role}).remote(args.model, slots)
                  for role in ("router", "experts")}
        where = {role: ray.get(a.where.remote()) for role, a in actors.items()}
        assert where["router"][1] == here and where["experts"][1] != here, where
        stubs = {role: expert_pb2_grpc.ExpertServiceStub(grpc.insecure_channel(addr, options=CHANNEL_OPTIONS))
                 for role, (addr, _) in where.items()}
        results = []
        for rows in [int(r) for r in args.rows.split(",")]:
            x = torch.randn(rows, cfg.hidden_size)
            counts = [rows - rows // 2, rows // 2]
            req = lambda: expert_pb2.ForwardRequest(layer=layer, hidden=to_proto(x), expert_id=[0, 1],  # noqa: E731
                                                    count=counts)
            row = {"rows": rows,
                   "in_process_ms_p50_p99": time_calls(lambda: local.run_subset(layer, x, [0, 1], counts), args.calls)}
            for role, label in (("router", "same_node_grpc_ms_p50_p99"), ("experts", "cross_node_grpc_ms_p50_p99")):
                row[label] = time_calls(lambda: stubs[role].Forward(req(), timeout=10), args.calls)
            results.append(row)
        print(json.dumps({"model": args.model, "hidden_size": cfg.hidden_size, "calls": args.calls,
                          "results": results}, indent=1))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
