"""Prometheus metrics of the router (low cardinality: no per-request labels)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REGISTRY = CollectorRegistry()
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

REQUESTS = Counter("moe_requests", "requests by API and outcome", ["api", "outcome"], registry=REGISTRY)
GENERATED_TOKENS = Counter("moe_generated_tokens", "tokens generated", registry=REGISTRY)
EXPERT_TOKENS = Counter("moe_expert_tokens", "(token, expert) pairs computed", registry=REGISTRY)
TTFT = Histogram("moe_time_to_first_token_seconds", "time to first token", buckets=_LATENCY_BUCKETS,
                 registry=REGISTRY)
ITL = Histogram("moe_inter_token_latency_seconds", "time between tokens of a stream", buckets=_LATENCY_BUCKETS,
                registry=REGISTRY)
RUNNING = Gauge("moe_running_sequences", "sequences in the running batch", registry=REGISTRY)
WAITING = Gauge("moe_waiting_sequences", "requests queued for a KV-cache slot", registry=REGISTRY)
REBALANCES = Counter("moe_rebalances", "expert placement changes by outcome", ["outcome"], registry=REGISTRY)
WEIGHT_BYTES_MOVED = Counter("moe_weight_bytes_moved", "expert weight bytes loaded for new copies", registry=REGISTRY)
REBALANCE_SECONDS = Histogram("moe_rebalance_seconds", "time per placement change (load, switch, drain, retire)",
                              buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=REGISTRY)
EXPERT_CALL_FAILURES = Counter("moe_expert_call_failures", "expert calls that failed or timed out (re-sent to "
                               "another copy when one is live)", ["code"], registry=REGISTRY)
WORKERS_DOWN = Gauge("moe_expert_workers_down", "expert workers the router is waiting on to come back",
                     registry=REGISTRY)
# One series per MoE layer: bounded by the model, not by traffic.
EXPERT_IMBALANCE = Gauge("moe_layer_expert_load_max_over_mean",
                         "hottest expert's load / mean expert load (EMA of tokens per step)", ["layer"],
                         registry=REGISTRY)
WORKER_IMBALANCE = Gauge("moe_layer_worker_load_max_over_mean",
                         "most-loaded expert worker / mean worker load under the current placement", ["layer"],
                         registry=REGISTRY)
COPIES = Gauge("moe_expert_copies", "expert copies held per worker (current placement)", ["worker"],
               registry=REGISTRY)


def render(stats: dict[str, float], load: dict) -> bytes:
    RUNNING.set(stats["running"])
    WAITING.set(stats["waiting"])
    for layer, ratio in zip(load["layers"], load["max_over_mean"]):
        EXPERT_IMBALANCE.labels(str(layer)).set(ratio)
    return generate_latest(REGISTRY)
