"""Write the Grafana dashboard and alert rules for moe-cluster's Prometheus metrics (deployments/metrics.py).

    .venv/bin/python tools/grafana_dashboard.py > k8s/grafana/moe-cluster-dashboard.json
    .venv/bin/python tools/grafana_dashboard.py --alerts > k8s/grafana/alert-rules.yaml

Import the JSON in Grafana (Dashboards → Import) and pick the Prometheus data source
that scrapes /metrics; put the alert rules in Grafana's provisioning folder
(alerting/). tests/deployments/test_grafana.py checks that every query names a metric
the server exports and that both files are up to date.
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
    ("KV cache in use per router", "percentunit", [("moe_kv_cache_usage_ratio", "router {{router}}")]),
    ("Preemptions (KV cache out of room)", "ops", [("sum by (router) (rate(moe_preemptions_total[1m]))",
                                                    "router {{router}}")]),
    ("Expert load max/mean per layer", "none", [("moe_layer_expert_load_max_over_mean", "layer {{layer}}")]),
    ("Worker load max/mean per layer", "none", [("moe_layer_worker_load_max_over_mean", "layer {{layer}}")]),
    ("Expert copies per worker", "none", [("moe_expert_copies", "worker {{worker}}")]),
    ("Rebalances", "none", [("sum by (outcome) (increase(moe_rebalances_total[5m]))", "{{outcome}}")]),
    ("Weight bytes moved", "bytes", [("increase(moe_weight_bytes_moved_total[5m])", "bytes / 5 min")]),
    ("Time per rebalance", "s", [
        ("histogram_quantile(0.5, sum by (le) (rate(moe_rebalance_seconds_bucket[15m])))", "p50"),
        ("histogram_quantile(0.99, sum by (le) (rate(moe_rebalance_seconds_bucket[15m])))", "p99")]),
    ("Rebalancing progress: seconds since the last successful change", "s", [
        ("time() - moe_last_rebalance_success_timestamp_seconds", "since last success"),
        ("max(moe_layer_worker_load_max_over_mean)", "worst layer max/mean (right now)")]),
    ("Rebalances that did not finish", "none", [
        ('sum by (outcome) (increase(moe_rebalances_total{outcome=~"failed|abandoned"}[15m]))', "{{outcome}}")]),
    ("Expert copy bytes per worker", "bytes", [("moe_expert_copy_bytes", "worker {{worker}}")]),
    ("Expert-call failures and workers down", "none", [
        ("sum by (code) (increase(moe_expert_call_failures_total[5m]))", "failed calls {{code}}"),
        ("moe_expert_workers_down", "workers down")]),
    ("Expert rows per tier (fast tier's share)", "none", [
        ("sum by (tier) (rate(moe_tier_expert_rows_total[1m]))", "{{tier}} rows/s"),
        ('sum(rate(moe_tier_expert_rows_total{tier="fast"}[5m])) / sum(rate(moe_tier_expert_rows_total[5m]))',
         "fast share")]),
    ("Expert copy bytes per tier", "bytes", [("moe_tier_expert_copy_bytes", "{{tier}}")]),
    ("Expert bytes moved per tier", "bytes", [("sum by (tier) (increase(moe_tier_bytes_moved_total[5m]))",
                                               "{{tier}} / 5 min")]),
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


# (uid, title, PromQL that is > 0 when firing, for, summary)
ALERTS = [
    ("moe-rebalance-stuck", "No successful rebalance while expert load is imbalanced",
     "(max(moe_layer_worker_load_max_over_mean) > 1.3) and on() "
     "((time() - max(moe_last_rebalance_success_timestamp_seconds)) > 600)", "5m",
     "The worst layer's worker max/mean load is above 1.3 and no placement change has finished for 10 min: "
     "rebalancing is stuck, skipped or disabled (see /admin/autoscaler)."),
    ("moe-rebalance-failing", "Rebalances fail or are abandoned",
     'sum(increase(moe_rebalances_total{outcome=~"failed|abandoned"}[15m])) > 0', "0m",
     "A placement change failed to load copies or not every router switched within switch_timeout_s "
     "(nothing was retired; the next change can run)."),
]


def alert_rules() -> dict:
    """Grafana's alert-rule provisioning format (alerting/*.yaml)."""
    def rule(uid, title, expr, wait, summary):
        return {"uid": uid, "title": title, "condition": "A", "for": wait, "noDataState": "OK",
                "execErrState": "Error", "annotations": {"summary": summary}, "labels": {"service": "moe-cluster"},
                "data": [{"refId": "A", "relativeTimeRange": {"from": 600, "to": 0}, "datasourceUid": "prometheus",
                          "model": {"refId": "A", "expr": expr, "instant": True}}]}

    return {"apiVersion": 1, "groups": [{"orgId": 1, "name": "moe-cluster", "folder": "moe-cluster",
                                         "interval": "1m", "rules": [rule(*a) for a in ALERTS]}]}


if __name__ == "__main__":
    import sys

    if "--alerts" in sys.argv:
        import yaml

        print(yaml.safe_dump(alert_rules(), sort_keys=False), end="")
    else:
        print(json.dumps(dashboard(), indent=1))
