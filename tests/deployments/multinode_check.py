"""Run by test_multinode.py in its own process: a real two-node Ray cluster on this machine
(head labelled role=router, a second node labelled role=experts, both on 127.0.0.1), the app
deployed with expert workers pinned to nodes by per-worker label selectors. Prints one JSON line."""
import json
import os
import sys
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a second local node joins without a shared token
# Ray rewrites a 127.0.0.1 bootstrap address to the machine's routable IP unless this is off;
# off, both nodes and the driver stay on loopback (the tests' network rule).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray  # noqa: E402
import requests  # noqa: E402
from ray import serve  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from deployments.app import build_app  # noqa: E402
from deployments.config import app_config  # noqa: E402


def main() -> None:
    model, port = sys.argv[1], int(sys.argv[2])
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "node_ip_address": "127.0.0.1", "labels": {"moe-cluster/role": "router"}})
    cluster.add_node(num_cpus=4, node_ip_address="127.0.0.1", labels={"moe-cluster/role": "experts"})
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # Worker 0 next to the router, workers 1 and 2 on the experts node; every expert on two workers.
        selectors = [{"moe-cluster/role": "router"}, {"moe-cluster/role": "experts"}, {"moe-cluster/role": "experts"}]
        cfg = app_config({"model": model, "num_workers": 3, "expert_copies": 2, "routers": {"num_cpus": 0.5},
                          "max_num_seqs": 8, "max_model_len": 256,
                          "worker": {"num_cpus": 0.5, "torch_threads": 1, "label_selectors": selectors}})
        serve.run(build_app(cfg), name="moe", route_prefix="/")
        nodes = {n["NodeID"]: n.get("Labels", {}).get("moe-cluster/role") for n in ray.nodes() if n["Alive"]}
        base = f"http://127.0.0.1:{port}"
        tokens = [requests.post(f"{base}/v1/completions", timeout=120,
                                json={"prompt": p, "max_tokens": 8, "temperature": 0}).json()["choices"][0]["token_ids"]
                  for p in ([5, 17, 33], [100, 3])]
        t0 = time.perf_counter()
        deadline = time.monotonic() + 30  # routers report their counters every 0.5 s
        stats = requests.get(f"{base}/admin/stats", timeout=30).json()
        while len(stats["data_plane"]["calls_per_worker"]) < 3 and time.monotonic() < deadline:
            time.sleep(0.5)
            stats = requests.get(f"{base}/admin/stats", timeout=30).json()
        [router] = stats["routers"].values()
        print(json.dumps({"node_roles": nodes, "tokens": tokens, "data_plane": stats["data_plane"],
                          "same_node_workers": router["data_plane"]["same_node_workers"],
                          "steps": stats["steps"], "step_seconds": stats["step_seconds"],
                          "stats_ms": 1000 * (time.perf_counter() - t0)}), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
