"""The Grafana dashboard queries only metrics the router exports, and is up to date."""
import json
import re
import subprocess
import sys
from pathlib import Path

from deployments import metrics

ROOT = Path(__file__).resolve().parent.parent.parent
DASHBOARD = ROOT / "k8s" / "grafana" / "moe-cluster-dashboard.json"


def exported_series() -> set[str]:
    return metrics.exported_series()


def test_every_query_names_an_exported_metric():
    queries = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
    used = {name for q in queries for name in re.findall(r"\bmoe_[a-z_]+", q)}
    assert used and used <= exported_series(), used - exported_series()


def test_every_alert_names_an_exported_metric_and_the_file_is_current():
    import yaml

    rules = yaml.safe_load((ROOT / "k8s" / "grafana" / "alert-rules.yaml").read_text())
    exprs = [d["model"]["expr"] for g in rules["groups"] for r in g["rules"] for d in r["data"]]
    used = {name for e in exprs for name in re.findall(r"\bmoe_[a-z_]+", e)}
    assert "moe_last_rebalance_success_timestamp_seconds" in used and used <= exported_series()
    out = subprocess.run([sys.executable, "tools/grafana_dashboard.py", "--alerts"], cwd=ROOT, capture_output=True,
                         text=True, check=True, env={"PYTHONPATH": str(ROOT)}).stdout
    assert yaml.safe_load(out) == rules


def test_dashboard_file_is_generated_from_the_tool():
    out = subprocess.run([sys.executable, "tools/grafana_dashboard.py"], cwd=ROOT, capture_output=True, text=True,
                         check=True, env={"PYTHONPATH": str(ROOT)}).stdout
    assert json.loads(out) == json.loads(DASHBOARD.read_text())
