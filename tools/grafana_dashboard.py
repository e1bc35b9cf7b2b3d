"""Write the Grafana dashboard for moe-cluster's Prometheus metrics (deployments/metrics.py).

    .venv/bin/python tools/grafana_dashboard.py > k8s/grafana/moe-cluster-dashboard.json

Import the JSON in Grafana (Dashboards → Import) and pick the Prometheus data source
that scrapes the router's /metrics. tests/deployments/test_grafana.py checks that every
query names a metric the router exports and that the file is up to date.
"""
from __future__ import annotations

import json

# (title, unit, [(PromQL, legend)]) — one panel each, two per row.
PANELS = [
    ("Requests by outcome", "reqps", [("sum by (api, outcome) (rate(moe_requests_total[1m]))", "{{api}} {{outcome}}")]),
    ("Tokens generated / s", "none", [("rate(moe_generated_tokens_total[1m])", "tokens/s"),
                                      ("rate(moe_expert_tokens_total[1m])", "(token, expert) pairs/s")]),
    ("Time to first token", "s", [
        ("histogram_quantile(0.5, sum by (le) (rate(moe_time_to_first_token_seconds_bucket[1m])))", "p50"),
        ("histogram_quantile(0.99, sum by (le) (rate(moe_time_to_first_token_seconds_bucket[1m])))", "p99")]),
    ("Inter-token latency", "s", [
        ("histogram_quantile(0.5, sum by (le) (rate(moe_inter_token_latency_seconds_bucket[1m])))", "p50"),
        ("histogram_quantile(0.99, sum by (le) (rate(moe_inter_token_latency_seconds_bucket[1m])))", "p99")]),
    ("Batch and queue", "none", [("moe_running_sequences", "running"), ("moe_waiting_sequences", "queued")]),
    ("Expert load max/mean per layer", "none", [("moe_layer_expert_load_max_over_mean", "layer {{layer}}")]),
    ("Worker load max/mean per layer", "none", [("moe_layer_worker_load_max_over_mean", "layer {{layer}}")]),
    ("Expert copies per worker", "none", [("moe_expert_copies", "worker {{worker}}")]),
    ("Rebalances", "none", [("sum by (outcome) (increase(moe_rebalances_total[5m]))", "{{outcome}}")]),
    ("Weight bytes moved", "bytes", [("increase(moe_weight_bytes_moved_total[5m])", "bytes / 5 min")]),
    ("Time per rebalance", "s", [
        ("histogram_quantile(0.5, sum by (le) (rate(moe_rebalance_seconds_bucket[15m])))", "p50"),
        ("histogram_quantile(0.99, sum by (le) (rate(moe_rebalance_seconds_bucket[15m])))", "p99")]),
    ("Expert-call failures and workers down", "none", [
        ("sum by (code) (increase(moe_expert_call_failures_total[5m]))", "failed calls {{code}}"),
        ("moe_expert_workers_down", "workers down")]),
]


def panel(i: int, title: str, unit: str, queries: list[tuple[str, str]]) -> dict:
    return {"id": i + 1, "type": "timeseries", "title": title,
            "gridPos": {"x": 12 * (i % 2), "y": 8 * (i // 2), "w": 12, "h": 8},
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"refId": chr(ord("A") + k), "expr": expr, "legendFormat": legend}
                        for k, (expr, legend) in enumerate(queries)]}


def dashboard() -> dict:
    return {"title": "moe-cluster", "uid": "moe-cluster", "schemaVersion": 39, "version": 1,
            "time": {"from": "now-1h", "to": "now"}, "refresh": "10s", "tags": ["moe-cluster", "ray-serve"],
            "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus",
                                     "label": "Prometheus"}]},
            "panels": [panel(i, *p) for i, p in enumerate(PANELS)]}


if __name__ == "__main__":
    print(json.dumps(dashboard(), indent=1))
