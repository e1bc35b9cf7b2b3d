"""Latency of one expert call by transport: in the router's process, shared memory and gRPC to a
worker on the router's own Ray node, gRPC to a worker on another Ray node (a two-node Ray
cluster on this machine, both nodes on 127.0.0.1). Same experts, same rows; the "router" is
this process, calling `Transport.forward` as the router's thread pool does.

    .venv/bin/python bench/expert_call_latency.py [--model models/demo] [--rows 1,64,512,4096] [--calls 200]

On one machine "another node" is a second raylet reached over loopback, so the gRPC figures
bound the cost of the transport itself; across real hosts add the network's RTT. Every
figure includes the experts' compute (the in-process column is that compute alone).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # the second local node joins without a shared token
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on 127.0.0.1

import ray  # noqa: E402
import torch  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from cluster.loader import load_experts, open_model  # noqa: E402
from cluster.model.experts import LocalExperts  # noqa: E402
from cluster.placement import WorkerRef  # noqa: E402
from deployments.experts import transport  # noqa: E402
from deployments.experts.host import ExpertHost, WorkerSpec  # noqa: E402

SECRET = "bench-data-plane-secret"
COLUMNS = ("in-process", "shm (same node)", "gRPC (same node)", "gRPC (other node)")


@ray.remote(num_cpus=0.5)
class WorkerOnNode:
    """An expert worker (the same ExpertHost the Serve replicas run) on a chosen Ray node, without Serve."""

    def __init__(self, spec: WorkerSpec):
        self.host = ExpertHost(spec, node_id=ray.get_runtime_context().get_node_id())

    def where(self) -> WorkerRef:
        return self.host.ref()


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


def table(results: list[dict]) -> str:
    lines = ["| rows | " + " | ".join(f"{c} p50 / p99 ms" for c in COLUMNS) + " |",
             "|---:|" + "---:|" * len(COLUMNS)]
    for r in results:
        lines.append(f"| {r['rows']} | " + " | ".join(f"{r[c][0]:.3f} / {r[c][1]:.3f}" for c in COLUMNS) + " |")
    return "\n".join(lines)


def measure(args, cfg, layer: int, local: LocalExperts, refs: dict[str, WorkerRef], here: str) -> list[dict]:
    calls = {name: transport.connect(refs[role], node_id=here, device="cpu", secret=SECRET, prefer=prefer)
             for name, role, prefer in (("shm (same node)", "router", "shm"), ("gRPC (same node)", "router", "grpc"),
                                        ("gRPC (other node)", "experts", "auto"))}
    results = []
    for rows in [int(r) for r in args.rows.split(",")]:
        x = torch.randn(rows, cfg.expert_row_size)
        counts = [rows - rows // 2, rows // 2]
        row = {"rows": rows, "in-process": time_calls(lambda: local.run_subset(layer, x, [0, 1], counts), args.calls)}
        for name, t in calls.items():
            row[name] = time_calls(lambda: t.forward(layer, x, [0, 1], counts, 30), args.calls)
        results.append(row)
    for t in calls.values():
        t.close()
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/demo")
    p.add_argument("--rows", default="1,64,512,4096", help="rows (token-expert pairs) per call")
    p.add_argument("--calls", type=int, default=200)
    args = p.parse_args()
    torch.set_num_threads(1)
    ckpt, family, cfg = open_model(args.model)
    layer = cfg.moe_layer_ids[0]
    experts = [(layer, 0), (layer, 1)]
    local = LocalExperts(load_experts(ckpt, family, cfg, experts))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "node_ip_address": "127.0.0.1",
                                                            "labels": {"role": "router"}})
    cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1", labels={"role": "experts"})
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        here = ray.get_runtime_context().get_node_id()
        spec = WorkerSpec(model=args.model, secret=SECRET, experts=tuple(experts), name="bench")
        actors = {role: WorkerOnNode.options(label_selector={"role": role}).remote(spec)
                  for role in ("router", "experts")}
        refs = {role: ray.get(a.where.remote()) for role, a in actors.items()}
        assert refs["router"].node_id == here and refs["experts"].node_id != here, refs
        results = measure(args, cfg, layer, local, refs, here)
        print(table(results))
        print(json.dumps({"model": args.model, "hidden_size": cfg.hidden_size, "calls": args.calls,
                          "results": results}))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
