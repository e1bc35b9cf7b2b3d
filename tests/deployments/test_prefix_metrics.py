"""Prefix-cache figures: what an engine reports, summed in /admin/stats and per router in /metrics."""
from prometheus_client import generate_latest

from cluster.engine import LLMEngine, SamplingParams
from deployments import metrics
from deployments.cluster_view import _prefix_metrics, _sum_stats
from deployments.messages import RouterReport


def _report(router_id: str, stats: dict) -> RouterReport:
    return RouterReport("b", router_id, "n", 1, [], [], None, (), stats)


def test_engine_cache_stats_reach_admin_stats_and_metrics(checkpoint_factory):
    engine = LLMEngine.from_pretrained(str(checkpoint_factory("mixtral")), max_num_seqs=2, max_model_len=64,
                                       block_size=4)
    system = list(range(1, 13))
    engine.generate([system + [20, 21]], SamplingParams(max_tokens=2, temperature=0))
    engine.generate([system + [30]], SamplingParams(max_tokens=2, temperature=0))
    a = engine.cache_stats()
    assert a["prefix_cache_hit_tokens"] == 12 and a["prefix_cache_query_tokens"] == 27
    assert a["prefix_cached_blocks"] >= 3 and a["prefix_cache_evictions"] == 0
    b = {**a, "prefix_cache_hit_tokens": 0, "prefix_cache_query_tokens": 13, "prefix_cached_blocks": 1}
    reports = [_report("r0", a), _report("r1", b)]
    summed = _sum_stats(reports)
    assert summed["prefix_cache_hit_tokens"] == 12 and summed["prefix_cache_hit_rate"] == 12 / 40
    _prefix_metrics(reports)
    text = generate_latest(metrics.CLUSTER).decode()
    assert 'moe_prefix_cache_hit_tokens_total{router="r0"} 12.0' in text
    assert 'moe_prefix_cache_query_tokens_total{router="r1"} 13.0' in text
    assert 'moe_prefix_cached_blocks{router="r1"} 1.0' in text
    assert 'moe_prefix_cache_evictions_total{router="r0"} 0.0' in text


def test_usage_reports_cached_prompt_tokens():
    from cluster.engine.engine import StepOutput
    from deployments.api.responses import ChoiceResult, usage

    choices = [ChoiceResult(i, list(range(20))) for i in range(2)]  # n = 2: one prompt, counted once
    for c in choices:
        c.add(StepOutput("r", 5, "x", None, "length", prompt_tokens=20, completion_tokens=1, cached_tokens=16))
    u = usage(choices, 2)
    assert u["prompt_tokens"] == 20 and u["prompt_tokens_details"] == {"cached_tokens": 16}


def test_grpc_usage_reports_cached_prompt_tokens_as_http_does():
    from cluster.engine.engine import StepOutput
    from deployments.api.grpc import _usage
    from deployments.api.responses import ChoiceResult
    from protos import moe_serving_pb2 as pb

    c = ChoiceResult(0, list(range(20)))
    c.add(StepOutput("r", 5, "x", None, "length", prompt_tokens=20, completion_tokens=1, cached_tokens=16))
    u = _usage(c)
    assert (u.prompt_tokens, u.completion_tokens, u.prompt_tokens_details.cached_tokens) == (20, 1, 16)
    assert pb.Usage.FromString(pb.Usage(prompt_tokens=3).SerializeToString()).prompt_tokens_details.cached_tokens == 0


def test_kv_cache_usage_and_preemptions_per_router_in_metrics():
    """/metrics had no KV-cache figure: an operator could not see a router running out of room."""
    from deployments.cluster_view import _kv_metrics

    reports = [_report("r0", {"kv_blocks": 8, "free_kv_blocks": 2, "preemptions": 3}),
               _report("r1", {"kv_blocks": 8, "free_kv_blocks": 8, "preemptions": 0})]
    _kv_metrics(reports)
    text = generate_latest(metrics.CLUSTER).decode()
    assert 'moe_kv_cache_usage_ratio{router="r0"} 0.75' in text and 'moe_kv_cache_usage_ratio{router="r1"} 0.0' in text
    assert 'moe_preemptions_total{router="r0"} 3.0' in text
    _kv_metrics(reports[1:])  # r0 has gone
    text = generate_latest(metrics.CLUSTER).decode()
    assert 'moe_kv_cache_usage_ratio{router="r0"}' not in text
