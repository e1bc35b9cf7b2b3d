"""/metrics is the service's: every ingress replica's figures summed by the controller (deployments/metrics.py).

Two real prometheus_client registries stand for two ingress replicas (each process has one `API`); the
controller's side is the real IngressBoard and render_summed. The served check (2 ingress replicas) is in
tests/deployments/test_scale_out.py.
"""
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.parser import text_string_to_metric_families

from deployments import metrics
from deployments.ingress_board import IngressBoard

BUCKETS = (0.1, 1, 10)
OK = ("moe_requests_total", (("api", "http"), ("outcome", "ok")))


def _replica() -> tuple[CollectorRegistry, Counter, Histogram]:
    """One replica's registry, shaped as `API` (same names, labels and buckets in every replica)."""
    registry = CollectorRegistry()
    requests = Counter("moe_requests", "requests", ["api", "outcome"], registry=registry)
    ttft = Histogram("moe_time_to_first_token_seconds", "ttft", buckets=BUCKETS, registry=registry)
    return registry, requests, ttft


def _samples(text: str) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_counters_and_histogram_buckets_sum_over_replicas():
    (ra, req_a, ttft_a), (rb, req_b, ttft_b) = _replica(), _replica()
    req_a.labels("http", "ok").inc(3)
    req_b.labels("http", "ok").inc(4)
    req_b.labels("grpc", "error").inc()  # a label set only one replica has counted
    for x in (0.05, 0.5):
        ttft_a.observe(x)
    for x in (0.5, 5, 50):
        ttft_b.observe(x)
    got = _samples(metrics.render_summed([metrics.ingress_figures(ra, "a"), metrics.ingress_figures(rb, "b")]))
    assert got[OK] == 7
    assert got[("moe_requests_total", (("api", "grpc"), ("outcome", "error")))] == 1
    buckets = {dict(k[1])["le"]: v for k, v in got.items() if k[0] == "moe_time_to_first_token_seconds_bucket"}
    assert buckets == {"0.1": 1, "1.0": 3, "10.0": 4, "+Inf": 5}  # cumulative, bucket by bucket
    assert got[("moe_time_to_first_token_seconds_count", ())] == 5
    assert got[("moe_time_to_first_token_seconds_sum", ())] == 0.05 + 0.5 + 0.5 + 5 + 50
    assert not [k for k in got if k[0].endswith("_created")]  # per-process start times do not add up


def test_a_gone_replica_keeps_its_counts_and_the_answer_is_the_same_whoever_asks():
    (ra, req_a, _), (rb, req_b, _) = _replica(), _replica()
    board = IngressBoard()
    req_a.labels("http", "ok").inc(2)
    req_b.labels("http", "ok").inc(5)
    board.report("a", 0, metrics.ingress_figures(ra, "pa"))
    board.report("b", 1, metrics.ingress_figures(rb, "pb"))
    first = metrics.render_summed(board.figures())
    board.report_figures("a", metrics.ingress_figures(ra, "pa"))  # "a" answers the next scrape: nothing new
    assert metrics.render_summed(board.figures()) == first
    req_a.labels("http", "ok").inc()
    board.report("a", 0, metrics.ingress_figures(ra, "pa"))  # "b" has gone: it reports no more
    board.report("a", 0, None)  # a report without figures keeps the last ones
    assert _samples(metrics.render_summed(board.figures()))[OK] == 8  # never down: b's 5 stay


def test_a_late_older_snapshot_does_not_lower_the_sum():
    """A half-second report and a scrape from one replica are two calls: the older may arrive second."""
    registry, requests, _ = _replica()
    board = IngressBoard()
    requests.labels("http", "ok").inc()
    older = metrics.ingress_figures(registry, "p")
    requests.labels("http", "ok").inc()
    board.report_figures("a", metrics.ingress_figures(registry, "p"))
    board.report("a", 0, older)
    assert _samples(metrics.render_summed(board.figures()))[OK] == 2


def test_a_replica_restarted_under_its_id_adds_to_what_it_counted_before():
    (before, req_before, _), (after, req_after, _) = _replica(), _replica()
    board = IngressBoard()
    req_before.labels("http", "ok").inc(9)
    board.report("a", 0, metrics.ingress_figures(before, "first process"))
    req_after.labels("http", "ok").inc(1)  # a new process counts from zero
    board.report("a", 0, metrics.ingress_figures(after, "second process"))
    assert _samples(metrics.render_summed(board.figures()))[OK] == 10


def test_every_api_family_travels_and_no_replica_label_is_added():
    figures = metrics.ingress_figures()  # this process's real `API` registry
    names = {f.name for f in figures.families}
    assert names == {"moe_requests", "moe_generated_tokens", "moe_expert_tokens", "moe_time_to_first_token_seconds",
                     "moe_inter_token_latency_seconds", "moe_route_choices", "moe_requests_resumed"}
    text = metrics.render_summed([figures, figures])
    assert "# TYPE moe_generated_tokens_total counter" in text
    assert "# TYPE moe_inter_token_latency_seconds histogram" in text
    labels = {k for f in text_string_to_metric_families(text) for s in f.samples for k in s.labels}
    assert labels <= {"api", "outcome", "reason", "le"}  # low cardinality: no replica ids
