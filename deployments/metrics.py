"""Prometheus metrics (low cardinality: no per-request labels, no per-replica labels for the ingress).

Two registries, one per process that counts the figures: `API` in each ingress
replica (requests, latencies, tokens), `CLUSTER` in the placement controller
(routers, expert load, placement, rebalancing, data-plane failures, gathered
from the routers' reports).

`/metrics` is the service's, whichever ingress replica answers: every replica
sends its `API` figures (`ingress_figures`) to the controller with its half-second
report and with each scrape, and the controller answers with its `CLUSTER`
registry plus the ingress figures summed over replicas (`render_summed`:
counters summed, histograms summed bucket by bucket). A replica that has gone
keeps its last figures in the sum, so a counter never goes down (Prometheus
would take a drop for a restart). A scrape is as fresh as the answering
replica's figures and the others' last report (at most half a second old).
"""
from __future__ import annotations

import itertools
import threading
import uuid
from dataclasses import dataclass
from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Metric, generate_latest
from prometheus_client.core import CounterMetricFamily


class ReportedCounter:
    """A counter whose value others count (each router since it started) and report: exposed as a
    Prometheus counter (`_total`) holding the sum of the latest reports."""

    def __init__(self, name: str, documentation: str, label: str, registry: CollectorRegistry):
        self.name, self.documentation, self.label = name, documentation, label
        self.values: dict[str, float] = {}
        registry.register(self)

    def set(self, values: dict[str, float]) -> None:
        self.values = dict(values)

    def collect(self):
        family = CounterMetricFamily(self.name, self.documentation, labels=[self.label])
        for value, total in sorted(self.values.items()):
            family.add_metric([value], total)
        yield family

API = CollectorRegistry()
CLUSTER = CollectorRegistry()
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

# -- ingress -------------------------------------------------------------------------------------
REQUESTS = Counter("moe_requests", "requests by API and outcome", ["api", "outcome"], registry=API)
GENERATED_TOKENS = Counter("moe_generated_tokens", "tokens generated", registry=API)
EXPERT_TOKENS = Counter("moe_expert_tokens", "(token, expert) pairs computed", registry=API)
TTFT = Histogram("moe_time_to_first_token_seconds", "time to first token", buckets=_LATENCY_BUCKETS, registry=API)
ITL = Histogram("moe_inter_token_latency_seconds", "time between tokens of a stream", buckets=_LATENCY_BUCKETS,
                registry=API)
ROUTE_CHOICES = Counter("moe_route_choices", "router replicas chosen for requests, by reason: affinity (the one "
                        "likely to hold the prompt's prefix), least_loaded, overloaded (the affine one was too busy)",
                        ["reason"], registry=API)
RESUMED = Counter("moe_requests_resumed", "requests moved to another router after theirs stopped", registry=API)

# -- controller ------------------------------------------------------------------------------------
ROUTERS = Gauge("moe_routers", "router replicas reporting to the controller", registry=CLUSTER)
RUNNING = Gauge("moe_running_sequences", "sequences in the running batch, all routers", registry=CLUSTER)
WAITING = Gauge("moe_waiting_sequences", "requests queued for a KV-cache slot, all routers", registry=CLUSTER)
TABLE_VERSION = Gauge("moe_placement_table_version", "version of the controller's placement table",
                      registry=CLUSTER)
REBALANCES = Counter("moe_rebalances", "placement changes by outcome: started, done, failed, abandoned, "
                     "skipped_<reason>", ["outcome"], registry=CLUSTER)
LAST_REBALANCE = Gauge("moe_last_rebalance_success_timestamp_seconds", "when the last placement change finished "
                       "(0: none yet)", registry=CLUSTER)
WEIGHT_BYTES_MOVED = Counter("moe_weight_bytes_moved", "checkpoint bytes read to load new expert copies (at the "
                             "checkpoint's dtype; the copy_bytes gauges count the serving dtype)", registry=CLUSTER)
REBALANCE_SECONDS = Histogram("moe_rebalance_seconds", "time per placement change (load, switch, retire)",
                              buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=CLUSTER)
EXPERT_CALL_FAILURES = ReportedCounter("moe_expert_call_failures", "expert calls that failed or timed out "
                                       "(re-sent to another copy when one is live), all routers", "code", CLUSTER)
WORKERS_DOWN = Gauge("moe_expert_workers_down", "expert workers some router saw fail and the controller has not "
                     "healed yet", registry=CLUSTER)
# Prefix caching, one series per router (each has its own KV cache); hit rate = hit / query tokens.
PREFIX_QUERY_TOKENS = ReportedCounter("moe_prefix_cache_query_tokens", "prompt tokens looked up in the prefix cache",
                                      "router", CLUSTER)
PREFIX_HIT_TOKENS = ReportedCounter("moe_prefix_cache_hit_tokens", "prompt tokens taken from the prefix cache (not "
                                    "computed)", "router", CLUSTER)
PREFIX_EVICTIONS = ReportedCounter("moe_prefix_cache_evictions", "cached KV blocks given to new contents", "router",
                                   CLUSTER)
PREFIX_CACHED_BLOCKS = Gauge("moe_prefix_cached_blocks", "KV blocks holding a reusable prefix", ["router"],
                             registry=CLUSTER)
KV_USAGE = Gauge("moe_kv_cache_usage_ratio", "share of a router's KV-cache blocks in use, 0 to 1 (cached prefixes "
                 "nobody uses count as free)", ["router"], registry=CLUSTER)
PREEMPTIONS = ReportedCounter("moe_preemptions", "sequences preempted for KV-cache room (their blocks freed, their "
                              "tokens recomputed when they resume)", "router", CLUSTER)
# One series per MoE layer or worker: bounded by the model and the pool, not by traffic.
EXPERT_IMBALANCE = Gauge("moe_layer_expert_load_max_over_mean",
                         "hottest expert's load / mean expert load (EMA of tokens per step)", ["layer"],
                         registry=CLUSTER)
WORKER_IMBALANCE = Gauge("moe_layer_worker_load_max_over_mean",
                         "most-loaded expert worker / mean worker load under the current placement", ["layer"],
                         registry=CLUSTER)
COPIES = Gauge("moe_expert_copies", "expert copies held per worker (current placement)", ["worker"],
               registry=CLUSTER)
COPY_BYTES = Gauge("moe_expert_copy_bytes", "expert weight bytes held per worker (current placement, at the serving dtype)", ["worker"],
                   registry=CLUSTER)
# Expert tiers (issue 23): one series per tier.
TIER_ROWS = ReportedCounter("moe_tier_expert_rows", "expert rows ((token, expert) pairs) sent to each tier's "
                            "workers, all routers", "tier", CLUSTER)
TIER_COPIES = Gauge("moe_tier_expert_copies", "expert copies held per tier (current placement)", ["tier"],
                    registry=CLUSTER)
TIER_MOVES = Counter("moe_tier_moves", "experts the online tier step moved: promoted (to the fast tier) or "
                     "demoted", ["direction"], registry=CLUSTER)
TIER_COPY_BYTES = Gauge("moe_tier_expert_copy_bytes", "expert weight bytes held per tier (current placement, at the serving dtype)",
                        ["tier"], registry=CLUSTER)
TIER_BYTES_MOVED = Counter("moe_tier_bytes_moved", "checkpoint bytes read to load new expert copies (at the "
                           "checkpoint's dtype), per tier of the worker that loaded them (promotions load on the fast tier, demotions on the host tier)",
                           ["tier"], registry=CLUSTER)


def render(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


# -- ingress figures, summed by the controller ------------------------------------------------------
Sample = tuple[str, tuple[tuple[str, str], ...], float]  # (sample name, labels in declared order, value)


@dataclass(frozen=True)
class IngressFamily:
    """One `API` metric family as one ingress replica counted it, small enough to send every report."""
    name: str
    type: str  # "counter" or "histogram" (all `API` has): both sum across replicas
    documentation: str
    samples: tuple[Sample, ...]


@dataclass(frozen=True)
class IngressFigures:
    """One ingress process's `API` figures at one moment."""
    process: str  # a replica restarted under its id counts from zero again: another process, kept apart
    seq: int  # in the order taken: a report and a scrape from one process may reach the controller swapped
    families: tuple[IngressFamily, ...]


_PROCESS = uuid.uuid4().hex[:12]
_SEQ = itertools.count()
_TAKING = threading.Lock()  # a seq and the values it stands for are taken together


def ingress_figures(registry: CollectorRegistry = API, process: str = _PROCESS) -> IngressFigures:
    """This process's figures. `_created` samples are left out: a per-process start time does not add up."""
    with _TAKING:
        return IngressFigures(process, next(_SEQ), tuple(
            IngressFamily(f.name, f.type, f.documentation,
                          tuple((s.name, tuple(s.labels.items()), s.value) for s in f.samples
                                if not s.name.endswith("_created")))
            for f in registry.collect()))


def summed(by_replica: Iterable[IngressFigures]) -> list[Metric]:
    """Every replica's figures added up sample by sample (a histogram's buckets have the same bounds in
    every replica: one code); a label set only some replicas have counted is summed over those."""
    totals: dict[str, tuple[IngressFamily, dict]] = {}
    for figures in by_replica:
        for family in figures.families:
            _, values = totals.setdefault(family.name, (family, {}))
            for name, labels, value in family.samples:
                values[name, labels] = values.get((name, labels), 0.0) + value
    out = []
    for name, (family, values) in totals.items():  # declaration order, as a registry renders
        metric = Metric(name, family.documentation, family.type)
        for (sample, labels), value in values.items():
            metric.add_sample(sample, dict(labels), value)
        out.append(metric)
    return out


class _Families:
    """What generate_latest reads: anything with collect()."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self):
        return iter(self.families)


def render_summed(by_replica: Iterable[IngressFigures]) -> str:
    return generate_latest(_Families(summed(by_replica))).decode()


def exported_series() -> set[str]:
    """Every series name /metrics can show (the Grafana dashboard may query only these)."""
    names = set()
    for registry in (API, CLUSTER):
        for family in registry.collect():
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
            names.update(family.name + s for s in suffixes)
    return names
