"""Issue 10 against a running server: requests that used to stop the engine or fail their
neighbours, error bodies in the OpenAI shape, and OpenAI fields honoured or refused by name."""
import json
import threading

import grpc
import pytest
import requests

from cluster.engine import LLMEngine, SamplingParams
from tests.deployments.clients import grpc_request, grpc_stub, http_complete
from tests.helpers import DEMO

pytestmark = pytest.mark.slow
PROMPT = "def main("


@pytest.fixture(scope="module")
def server(cluster):
    # Every step takes ≥ 20 ms: a long stream is certainly still running while short requests
    # come and go beside it (test_tiny_temperature_fails_nobody), however fast the machine.
    return cluster.deploy(str(DEMO), 2, engine_step_delay_s=0.02)


@pytest.fixture(scope="module")
def local():
    return LLMEngine.from_pretrained(str(DEMO), max_model_len=512)


def post(server, body, path="/v1/completions", **kw):
    return requests.post(f"{server.base}{path}", json=body, timeout=120, **kw)


def sse(server, body, path="/v1/completions") -> list:
    with requests.post(f"{server.base}{path}", json={**body, "stream": True}, stream=True, timeout=120) as r:
        assert r.status_code == 200, r.text
        events = [line[6:] for line in r.iter_lines() if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_a_huge_seed_is_refused_and_the_engine_goes_on(server, local):
    r = post(server, {"prompt": "def f(", "max_tokens": 2, "seed": 18446744073709551616})
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed"
    assert post(server, {"prompt": "def f(", "max_tokens": 2, "seed": 18446744073709551615}).status_code == 200
    expected = local.generate([PROMPT], SamplingParams(max_tokens=6, temperature=0))[0].token_ids
    assert http_complete(server.base, PROMPT, 6)["choices"][0]["token_ids"] == expected


def test_tiny_temperature_fails_nobody(server, local):
    """temperature 1e-40 in the same batch as a greedy stream: both served, the stream unchanged."""
    expected = local.generate([PROMPT], SamplingParams(max_tokens=300, temperature=0))[0].token_ids
    out = {}
    stream = threading.Thread(target=lambda: out.update(chunks=sse(server, {"prompt": PROMPT, "max_tokens": 300,
                                                                             "temperature": 0})))
    stream.start()
    tiny = [post(server, {"prompt": PROMPT, "max_tokens": 8, "temperature": 1e-40}) for _ in range(3)]
    assert stream.is_alive()  # ≥ 6 s of steps: the tiny requests ran beside it, in its batches
    stream.join(120)
    assert all(r.status_code == 200 for r in tiny)
    assert [c["choices"][0]["token_ids"][0] for c in out["chunks"]] == expected
    assert tiny[0].json()["choices"][0]["token_ids"] == expected[:8]  # greedy, as vLLM treats it


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/admin/policy"])
def test_deeply_nested_json_is_a_400_json_body(server, path):
    method = requests.put if path == "/admin/policy" else requests.post
    r = method(f"{server.base}{path}", data="[" * 50_000, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("body,path,param", [
    ('{"prompt": "abc\\ud800", "max_tokens": 2}', "/v1/completions", "prompt"),
    ('{"messages": [{"role": "user", "content": "hi \\udfff"}], "max_tokens": 2}', "/v1/chat/completions",
     "messages"),
])
def test_lone_surrogates_are_a_400_naming_the_field(server, body, path, param):
    r = requests.post(f"{server.base}{path}", data=body, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_invalid_utf8_is_a_400_json_body(server):
    r = requests.post(f"{server.base}/v1/completions", data=b'{"prompt": "\xff\xfe\xfa", "max_tokens": 2}',
                      headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_404_and_405_use_the_openai_error_shape(server):
    for r, code in ((requests.get(f"{server.base}/v1/nothing", timeout=30), 404),
                    (requests.get(f"{server.base}/v1/completions", timeout=30), 405)):
        assert r.status_code == code and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_request_id_is_used_only_when_short_and_plain(server):
    ok = post(server, {"prompt": PROMPT, "max_tokens": 1}, headers={"x-request-id": "abc-123"}).json()
    assert ok["id"] == "cmpl-abc-123"
    long = post(server, {"prompt": PROMPT, "max_tokens": 1}, headers={"x-request-id": "x" * 5000}).json()
    assert len(long["id"]) < 80 and "xxxx" not in long["id"]


def test_chat_stream_starts_with_the_role_and_ends_with_usage(server):
    # greedy: a sampled first token may be the end of text (2 in 30 at temperature 1), ending at 1 token
    chunks = sse(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0,
                          "stream_options": {"include_usage": True}}, "/v1/chat/completions")
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert all(c["usage"] is None for c in chunks[:-1])


def test_chat_logprobs_in_the_chat_shape(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0, timeout=120)
    out = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                         temperature=0, logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


def test_max_completion_tokens_and_logit_bias_are_honoured(server, local):
    def chat(**kw):
        return post(server, {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "ignore_eos": True,
                             **kw}, "/v1/chat/completions").json()
    assert chat(max_completion_tokens=5)["usage"]["completion_tokens"] == 5
    assert chat(max_completion_tokens=40)["usage"]["completion_tokens"] == 40
    greedy = http_complete(server.base, PROMPT, 1)["choices"][0]["token_ids"][0]
    biased = http_complete(server.base, PROMPT, 1, logit_bias={str(greedy): -100})["choices"][0]["token_ids"][0]
    assert biased != greedy
    plain = http_complete(server.base, PROMPT, 24)["choices"][0]["token_ids"]
    penalised = http_complete(server.base, PROMPT, 24, frequency_penalty=2.0)["choices"][0]["token_ids"]
    assert penalised != plain and len(set(penalised)) >= len(set(plain))


@pytest.mark.parametrize("body,path,param", [
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"properties": {"a": {"$ref": "#/definitions/missing"}}}}}},
     "/v1/chat/completions", "response_format"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": "required"}, "/v1/chat/completions", "tool_choice"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": "auto"}, "/v1/chat/completions", "tool_choice"),  # the demo's template has no call format
    ({"prompt": "x", "suffix": "y"}, "/v1/completions", "suffix"),
    ({"prompt": "x", "max_tokens": 0}, "/v1/completions", "max_tokens"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "/v1/completions", "stream_options"),
])
def test_unsupported_fields_are_refused_by_name(server, body, path, param):
    r = post(server, body, path)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_batched_prompts_and_n(server, local):
    prompts = ["def main(", "import os"]
    expected = [o.token_ids for o in local.generate(prompts, SamplingParams(max_tokens=5, temperature=0))]
    body = post(server, {"prompt": prompts, "max_tokens": 5, "temperature": 0}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert [c["token_ids"] for c in body["choices"]] == expected
    ids = [local.encode(p) for p in prompts]
    assert [c["token_ids"] for c in post(server, {"prompt": ids, "max_tokens": 5, "temperature": 0})
            .json()["choices"]] == expected
    sampled = post(server, {"prompt": PROMPT, "max_tokens": 6, "n": 3, "seed": 7, "temperature": 1.0}).json()
    again = post(server, {"prompt": PROMPT, "max_tokens": 6, "n": 3, "seed": 7, "temperature": 1.0}).json()
    assert [c["index"] for c in sampled["choices"]] == [0, 1, 2]
    assert [c["token_ids"] for c in sampled["choices"]] == [c["token_ids"] for c in again["choices"]]


def test_echo_scores_the_prompt(server, local):
    ids = local.encode("def main(self):")
    [ref] = local.generate([ids], SamplingParams(max_tokens=0, prompt_logprobs=1, temperature=0))
    body = post(server, {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1}).json()
    lp = body["choices"][0]["logprobs"]
    assert body["choices"][0]["text"] == local.tokenizer.decode(ids) and lp["token_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx([s.logprob for s in ref.prompt_logprobs[1:]], abs=1e-5)
    echoed = post(server, {"prompt": PROMPT, "max_tokens": 3, "echo": True, "temperature": 0}).json()
    assert echoed["choices"][0]["text"].startswith(PROMPT)


def test_grpc_success_is_counted_as_grpc_and_health_is_served(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    def grpc_ok() -> float:
        text = requests.get(f"{server.base}/metrics", timeout=30).text
        line = next((x for x in text.splitlines() if x.startswith('moe_requests_total{api="grpc",outcome="ok"}')),
                    None)
        return float(line.split()[-1]) if line else 0.0

    before = grpc_ok()
    grpc_stub(server.grpc_target).Complete(grpc_request(PROMPT, 2), timeout=60)
    assert grpc_ok() == before + 1
    channel = grpc.insecure_channel(server.grpc_target)
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING  # the fixture waited for readiness


def test_grpc_prompts_have_the_http_size_limit(server):
    with pytest.raises(grpc.RpcError) as e:
        grpc_stub(server.grpc_target).Complete(grpc_request("x" * (2 << 20), 2), timeout=60)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_tokenize_and_detokenize(server, local):
    body = post(server, {"prompt": PROMPT}, "/tokenize").json()
    assert body["tokens"] == local.encode(PROMPT) and body["count"] == len(body["tokens"])
    assert post(server, {"tokens": body["tokens"]}, "/detokenize").json()["prompt"] == PROMPT
    chat = post(server, {"messages": [{"role": "user", "content": "hi"}]}, "/tokenize").json()
    reply = post(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
                 "/v1/chat/completions").json()
    assert chat["count"] == reply["usage"]["prompt_tokens"]
    assert post(server, {"tokens": [10**6]}, "/detokenize").status_code == 400
