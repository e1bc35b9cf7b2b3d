"""Fuzzing the HTTP API of a running server: ~180 generated bodies and sampling parameters,
valid, borderline and invalid. None may get a 500 or hang, every error is an OpenAI error body,
and a well-formed request afterwards is served with the same output as before.

Examples are derandomized (the same every run), so CI is deterministic; counts per status are printed (-s).
"""
import json
from collections import Counter

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import DEMO

pytestmark = pytest.mark.slow
STATUSES: Counter = Counter()
REFERENCE = {"prompt": "def main(", "max_tokens": 12, "temperature": 0}

edge_floats = st.sampled_from([0.0, 1e-40, 1e-6, 1e-30, 0.5, 1.0, 2.0, 1e300, -1.0, -0.0, 100.0, 101.0])
edge_ints = st.sampled_from([0, 1, -1, 2**31, 2**63 - 1, -(2**63), 2**64 - 1, 2**64, 10**30])
texts = st.text(st.characters(codec="utf-8"), max_size=40) | st.sampled_from(["", "def f(", "\u0000", "a" * 3000])
token_lists = st.lists(st.integers(-5, 5000), max_size=12)
values = st.recursive(st.none() | st.booleans() | edge_floats | edge_ints | texts,
                      lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
                      max_leaves=8)


GOOD = {
    "prompt": st.sampled_from(["def main(", "import os\n", "The license"]) | st.lists(st.integers(0, 4095),
                                                                                    min_size=1, max_size=8),
    "max_tokens": st.integers(1, 8), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
    "top_k": st.integers(0, 60), "seed": st.integers(0, 2**32), "n": st.integers(1, 3),
    "stop": st.lists(st.sampled_from(["\n", ")", "def"]), max_size=2), "logprobs": st.integers(0, 5),
    "echo": st.booleans(), "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.5, 2), "min_tokens": st.integers(0, 1), "stream": st.booleans(),
    "logit_bias": st.dictionaries(st.integers(0, 4095).map(str), st.floats(-100, 100), max_size=3),
    "ignore_eos": st.booleans(), "return_routing": st.booleans(),
}
EDGE = {  # valid, at the edge of each type: served correctly or refused, never a crash
    "temperature": st.sampled_from([1e-40, 1e-6, 0.0, 2.0, 50.0]), "top_p": st.sampled_from([1e-30, 1.0]),
    "seed": st.sampled_from([0, 2**64 - 1, -(2**63), 2**64, -(2**63) - 1]),
    "logit_bias": st.sampled_from([{"0": 100.0}, {"1": -100.0, "2": 100.0}, {"5": 1e300}, {"-1": 1.0}]),
    "max_tokens": st.sampled_from([1, 500, 511, 512, 2**31]), "top_k": st.sampled_from([1, 4095, 4096, 10**9]),
    "n": st.sampled_from([1, 16, 17]), "logprobs": st.sampled_from([0, 20, 21]),
}
BAD = {**{k: values for k in GOOD}, "unknown_field": values, "suffix": texts, "best_of": st.integers(-1, 4)}


def body_of(fields: dict, edge: dict, bad: dict, required: str):
    """A third valid (all good fields), a third borderline (one edge value), a third invalid (any)."""
    names = sorted(fields)
    valid = st.fixed_dictionaries({required: fields[required]},
                                  optional={k: fields[k] for k in names if k != required})
    borderline = st.tuples(valid, st.sampled_from(sorted(edge)).flatmap(
        lambda k: edge[k].map(lambda v: (k, v)))).map(lambda t: {**t[0], t[1][0]: t[1][1]})
    invalid = st.tuples(valid, st.dictionaries(st.sampled_from(sorted(bad)), values, min_size=1, max_size=3)) \
        .map(lambda t: {**t[0], **t[1]})
    return st.one_of(valid, borderline, invalid)


MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                           "content": st.sampled_from(["hi", "def f(", "Tell me more."])}),
                    min_size=1, max_size=3)
CHAT_GOOD = {**{k: v for k, v in GOOD.items() if k not in ("prompt", "echo", "logprobs")}, "messages": MESSAGES,
             "max_completion_tokens": st.integers(1, 6), "logprobs": st.booleans(),
             "chat_template_kwargs": st.just({})}
CHAT_BAD = {**BAD, "messages": values, "response_format": st.sampled_from([{"type": "json_object"}, "text"]),
            "top_logprobs": st.integers(-1, 25), "tools": values}


raw_bodies = st.sampled_from(['{"prompt": "x", "temperature": NaN}', '{"prompt": "x", "max_tokens": Infinity}',
                              "[" * 5000, '{"prompt": "\\ud800"}', "null", '"text"', "{", "\xff\xfe"])


@pytest.fixture(scope="module")
def server(cluster):
    # A request that may generate hundreds of tokens (chat without max_completion_tokens, ignore_eos)
    # ends with a 408 well before the client's 60 s timeout, however slow the machine.
    return cluster.deploy(str(DEMO), 2, request_timeout_s=20)


def _check(r: requests.Response) -> None:
    STATUSES[r.status_code] += 1
    assert r.status_code < 500, r.text[:500]
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == r.status_code
        assert "Traceback" not in r.text and "/work/" not in r.text and len(r.content) < 4000
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]")


def _send(server, path: str, data: bytes | str) -> None:
    r = requests.post(f"{server.base}{path}", data=data, headers={"Content-Type": "application/json"}, timeout=60)
    _check(r)


@settings(max_examples=110, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(body=body_of(GOOD, EDGE, BAD, "prompt"))
def test_fuzz_completions(server, body):
    _send(server, "/v1/completions", json.dumps(body))


@settings(max_examples=50, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(body=body_of(CHAT_GOOD, {k: v for k, v in EDGE.items() if k != "logprobs"}, CHAT_BAD, "messages"))
def test_fuzz_chat(server, body):
    _send(server, "/v1/chat/completions", json.dumps(body))


@settings(max_examples=20, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=raw_bodies, path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/tokenize"]))
def test_fuzz_raw_bodies(server, raw, path):
    _send(server, path, raw.encode("utf-8"))


def test_served_the_same_after_the_fuzz(server):
    """Runs last in this module: the fuzz changed nothing for a well-formed request."""
    before = requests.post(f"{server.base}/v1/completions", json=REFERENCE, timeout=60).json()
    ready = requests.get(f"{server.base}/ready", timeout=30)
    print(f"\nfuzz: {sum(STATUSES.values())} requests, by status {dict(sorted(STATUSES.items()))}")
    assert ready.status_code == 200
    from cluster.engine import LLMEngine, SamplingParams

    expected = LLMEngine.from_pretrained(str(DEMO)).generate(["def main("], SamplingParams(max_tokens=12,
                                                                                            temperature=0))
    assert before["choices"][0]["token_ids"] == expected[0].token_ids
    assert sum(STATUSES.values()) >= 180 and STATUSES[500] == 0
