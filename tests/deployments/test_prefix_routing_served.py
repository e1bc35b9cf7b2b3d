"""Prefix-aware routing with 2 routers (issue 21): 16 multi-turn conversations, each turn resending
the whole conversation. With affinity every later turn meets its conversation's KV cache; Serve's
power of two choices lands about half of them on the router that never saw it. Hit rates are the
routers' own counters (/admin/stats), over turns 2-4 only; nothing here depends on timing.
A request's several choices (a list of prompts, n > 1) are routed each on its own, as one request is."""
import random
import time

import pytest
import requests

from tests.deployments.clients import concurrently, grpc_request, grpc_stub, http_complete
from tests.helpers import DEMO

CONVERSATIONS, TURNS, HEAD, MESSAGE = 16, 4, 96, 15  # tokens: a conversation's start, each later message


def _counters(base: str) -> dict[str, tuple[int, int]]:
    """Per live router: (prompt tokens looked up in its prefix cache, tokens found there)."""
    routers = requests.get(f"{base}/admin/stats", timeout=30).json()["routers"]
    return {r: (s["prefix_cache_query_tokens"], s["prefix_cache_hit_tokens"]) for r, s in routers.items()}


def _settled(base: str, before: dict, queried: int, limit_s: float = 60) -> dict[str, tuple[int, int]]:
    """Each router's counters moved since `before`, once its reports count all `queried` prompt tokens
    (they arrive with the routers' next reports; bounded wait)."""
    deadline = time.monotonic() + limit_s
    while True:
        now = _counters(base)
        moved = {r: (q - before.get(r, (0, 0))[0], h - before.get(r, (0, 0))[1]) for r, (q, h) in now.items()}
        if sum(q for q, _ in moved.values()) >= queried or time.monotonic() > deadline:
            return moved
        time.sleep(0.2)


def _chat(base: str, seed: int) -> tuple[float, dict[str, int], list[list[int]]]:
    """Runs the conversations turn by turn (all 16 at once per turn); returns the hit rate of turns
    2..TURNS, how many of their prompt tokens each router looked up, and each conversation's next prompt."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(1, 4096) for _ in range(HEAD)] for _ in range(CONVERSATIONS)]
    hits, queried = 0, {}
    for turn in range(TURNS):
        before = _counters(base)
        replies = concurrently(lambda i: http_complete(base, prompts[i], 1), range(CONVERSATIONS))
        moved = _settled(base, before, sum(r["usage"]["prompt_tokens"] for r in replies))
        if turn:
            hits += sum(h for _, h in moved.values())
            for router, (q, _) in moved.items():
                queried[router] = queried.get(router, 0) + q
        prompts = [p + r["choices"][0]["token_ids"] + [rng.randrange(1, 4096) for _ in range(MESSAGE)]
                   for p, r in zip(prompts, replies)]
    return hits / sum(queried.values()), queried, prompts


def _deploy(cluster):
    routers = {"min": 2, "max": 2, "num_cpus": 0.25}
    return cluster.deploy(str(DEMO), 0, routers={**routers, "prefix_aware": True}, max_num_seqs=16)


def _affinity_choices(base: str) -> float:
    """What the ingress's request router chose by affinity (moe_route_choices_total, all ingress replicas)."""
    line = 'moe_route_choices_total{reason="affinity"} '
    text = requests.get(f"{base}/metrics", timeout=30).text
    return next((float(l[len(line):]) for l in text.splitlines() if l.startswith(line)), 0.0)


def test_two_routers_conversations_meet_their_cache(cluster):
    c = _deploy(cluster)
    affinity, spread, next_turns = _chat(c.base, seed=1)
    chosen = _affinity_choices(c.base)
    # gRPC reports what the cache gave, as HTTP usage does: the whole last turn's prompt (full blocks)
    reply = grpc_stub(c.grpc_target).Complete(grpc_request(next_turns[0], 1), timeout=60)
    assert reply.usage.prompt_tokens_details.cached_tokens == HEAD + (TURNS - 1) * (MESSAGE + 1)
    print(f"\nhit rate of turns 2-{TURNS}: prefix-aware {affinity:.2f}; prompt tokens per router {spread}; "
          f"affinity choices {chosen:.0f}")
    # The most any routing gets here: each turn's earlier prompt, in full blocks (96 of 112 tokens, ...): 0.875.
    # Power of two choices on the same workload got 0.55-0.69 (docs/benchmarks.md); the suite runs only this
    # side: a second deployment would add its start-up to the serial half of the suite.
    assert affinity >= 0.8
    assert chosen >= 0.8 * CONVERSATIONS * (TURNS - 1)
    # Both took conversations. How evenly the 16 first turns, sent at once, split between two idle routers
    # depends on when each router's queue length reaches the ingress (a loaded machine gave 14 / 2), so only
    # that both took some is asserted here; the split itself is least_loaded's, tested in test_prefix_routing.
    assert len(spread) == 2 and min(spread.values()) > 0


def test_a_requests_concurrent_choices_are_all_routed(cluster):
    """A list of prompts and n > 1 reach the routers as concurrent calls from one ingress request (lm-eval's
    loglikelihoods: batched prompts, echo + logprobs, max_tokens 1). They once hung in the request router,
    and every later request with them (issue 21); each choice must score its own prompt."""
    c = _deploy(cluster)
    rng = random.Random(2)
    head = [rng.randrange(1, 4096) for _ in range(40)]  # two full blocks shared: affinity has a say
    prompts = [head + [rng.randrange(1, 4096) for _ in range(3 + i)] for i in range(4)]
    scoring = {"echo": True, "logprobs": 1}
    batched = http_complete(c.base, prompts, 1, **scoring)["choices"]
    assert [ch["index"] for ch in batched] == [0, 1, 2, 3]
    alone = [http_complete(c.base, p, 1, **scoring)["choices"][0] for p in prompts]
    for got, want in zip(batched, alone):
        assert got["token_ids"] == want["token_ids"]
        lp, ref = got["logprobs"]["token_logprobs"], want["logprobs"]["token_logprobs"]
        assert lp[0] is None and lp[1:] == pytest.approx(ref[1:], abs=1e-4)  # batch shapes differ: float noise
    sampled = http_complete(c.base, prompts[0], 4, n=3, seed=7, temperature=1.0)["choices"]
    assert [ch["index"] for ch in sampled] == [0, 1, 2] and all(len(ch["token_ids"]) == 4 for ch in sampled)
    plain = http_complete(c.base, prompts[1], 3)["choices"][0]
    assert len(plain["token_ids"]) == 3
