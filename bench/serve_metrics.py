"""The serving benchmark's pure arithmetic: percentiles, streams' timings, CPU by kind of process.

No I/O here (bench/serve_bench.py samples the process table and the clients; this module
turns samples into figures), so tests/test_serve_bench.py checks it without a server.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field

# Kinds of process, as the CPU table names them (one name per kind).
ROUTER = "router"
INGRESS = "ingress"
PROXY = "edge (HAProxy, Serve proxy)"
WORKERS = "expert workers"
LOAD_GENERATOR = "load generator"
TRANSFORMERS = "transformers-serve"
OTHER = "other (controllers, GCS, raylet, agents, driver)"
# Processes a token crosses after the router's engine made it (the edge): their CPU is all streaming.
TOKEN_PATH_EDGE = (INGRESS, PROXY)


def percentile_ms(seconds: list[float], q: int) -> float:
    """The q-th percentile (1..99) of durations in seconds, in ms; NaN with fewer than two values."""
    if len(seconds) < 2:
        return round(1000 * seconds[0], 2) if seconds else float("nan")
    return round(1000 * statistics.quantiles(seconds, n=100, method="inclusive")[q - 1], 2)


@dataclass
class Stream:
    """One streamed request as its client saw it: when it was sent, when each event carrying
    tokens arrived, and the tokens the server says it generated (usage; else the events)."""
    sent: float
    arrivals: list[float] = field(default_factory=list)
    tokens: int | None = None

    @property
    def ttft(self) -> float:
        return self.arrivals[0] - self.sent

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:])]

    @property
    def token_count(self) -> int:
        return self.tokens if self.tokens is not None else len(self.arrivals)


def latency_figures(streams: list[Stream], seconds: float) -> dict:
    """Throughput (generated tokens / wall time), TTFT and inter-token p50/p99 over all streams.
    Inter-token = the gap between two successive token-carrying events of a stream as its consumer
    saw them (tokens that arrive together count one gap of ~0)."""
    ttft = [s.ttft for s in streams if s.arrivals]
    itl = [g for s in streams for g in s.gaps]
    tokens = sum(s.token_count for s in streams)
    return {"streams": len(streams), "tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else float("nan"),
            "ttft_ms_p50": percentile_ms(ttft, 50), "ttft_ms_p99": percentile_ms(ttft, 99),
            "itl_ms_p50": percentile_ms(itl, 50), "itl_ms_p99": percentile_ms(itl, 99)}


def role_of(name: str, title: str, *, mine: bool = False, transformers: bool = False) -> str:
    """The kind of a process, from its name and its title (argv[0]; Ray sets it to
    `ray::ServeReplica:<app>:<deployment>` for a Serve replica, `ray::ProxyActor` for the proxy)."""
    if mine:
        return LOAD_GENERATOR
    if transformers:
        return TRANSFORMERS
    if "ServeReplica:" in title:
        deployment = title.split("ServeReplica:", 1)[1].split(":", 1)[-1].split(".", 1)[0].split(" ", 1)[0]
        if deployment.startswith(("expert-worker", "expert-pool")):
            return WORKERS
        return {"router": ROUTER, "ingress": INGRESS}.get(deployment, OTHER)
    if name == "haproxy" or title.startswith(("ray::ProxyActor", "ray::HAProxyManager")):
        return PROXY  # the edge: HAProxy (its process and Serve's manager of it), or Serve's Python proxy
    return OTHER


def cpu_by_role(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds spent between two samples of the process table ({pid: (role, cpu seconds)}),
    summed by role. A process that started between the samples counts from zero; one that ended
    is missed (its last figures are gone): the benchmark samples a server that stays up."""
    out: dict[str, float] = {}
    for pid, (role, cpu) in after.items():
        start = before.get(pid, (role, 0.0))[1]
        out[role] = out.get(role, 0.0) + max(cpu - start, 0.0)
    return out


def per_token_ms(cpu_seconds: dict[str, float], tokens: int) -> dict[str, float]:
    """CPU ms per streamed token of each role, largest first."""
    spent = sorted(cpu_seconds.items(), key=lambda kv: -kv[1])
    return {role: round(1000 * s / tokens, 3) for role, s in spent} if tokens else {}


def outside_engine_ms(cpu_ms: dict[str, float], router_step_ms: float) -> dict:
    """CPU ms per streamed token outside the engine's own compute: the edge processes on the token
    path (ingress + Serve proxy) plus the router's CPU less its engine steps' CPU (`router_step_ms`
    per token; what is left of the router is messaging: request handling, Serve's streaming, reports)."""
    edge = sum(cpu_ms.get(role, 0.0) for role in TOKEN_PATH_EDGE)
    router_messaging = max(cpu_ms.get(ROUTER, 0.0) - router_step_ms, 0.0)
    return {"edge_ms": round(edge, 3), "router_step_ms": round(router_step_ms, 3),
            "router_messaging_ms": round(router_messaging, 3), "total_ms": round(edge + router_messaging, 3)}


def router_step_ms(before: dict, after: dict, tokens: int, cpu_ms: dict[str, float],
                   in_process_cpu_ms: float) -> tuple[float, str]:
    """CPU ms per token of the routers' engine steps between two /admin/stats bodies, and where it
    came from: `step_cpu_seconds` where the routers report it (CPU time of their step thread).
    Else an estimate: the in-process engine's CPU per token on the same workload (all of the
    engine's compute) less what the expert workers spent (their share of it). The routers' step
    *wall* time is no estimate: on a shared machine it counts time the step thread waited for a
    core, and exceeds the router's whole CPU."""
    if "step_cpu_seconds" in after and tokens:
        spent = after["step_cpu_seconds"] - before.get("step_cpu_seconds", 0.0)
        return 1000 * spent / tokens, "routers' step_cpu_seconds"
    return (max(in_process_cpu_ms - cpu_ms.get(WORKERS, 0.0), 0.0),
            "estimate: in-process engine CPU per token less the expert workers' (routers report no step CPU time)")


def ratio(a: float, b: float) -> float:
    return round(a / b, 2) if b and b == b and a == a else float("nan")


def within(served: float, local: float, factor: float = 1.2, slack_ms: float = 2.0) -> bool:
    """The one-stream latency goal: served ≤ factor × in-process + slack."""
    return served <= factor * local + slack_ms
