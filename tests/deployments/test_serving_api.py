"""The public APIs on the demo model: the official openai client, metrics, and every bad input."""
import gzip
import json
import math

import grpc
import pytest
import requests

from cluster.engine import LLMEngine, SamplingParams
from tests.deployments.clients import grpc_request, grpc_stub, http_complete
from tests.helpers import DEMO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(cluster):
    return cluster.deploy(str(DEMO), 2)


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0, timeout=120)


def test_openai_client_completions_chat_and_stream(client):
    local = LLMEngine.from_pretrained(str(DEMO))
    expected = local.generate(["def main("], SamplingParams(max_tokens=12, temperature=0))[0]
    out = client.completions.create(model="demo", prompt="def main(", max_tokens=12, temperature=0)
    assert out.choices[0].text == expected.text
    assert out.usage.completion_tokens == len(expected.token_ids)
    chunks = list(client.completions.create(model="demo", prompt="def main(", max_tokens=12, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    chat = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Say hi"}],
                                          max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
    streamed = list(client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Say hi"}],
                                                   max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat.choices[0].message.content
    assert [m.id for m in client.models.list().data] == ["demo"]


def test_routing_and_expert_token_usage(server):
    body = http_complete(server.base, "import os\n", 5, return_routing=True, logprobs=2)
    choice, usage = body["choices"][0], body["usage"]
    assert len(choice["routing"]) == 5
    for token in choice["routing"]:
        assert [layer["layer"] for layer in token] == [0, 1, 2, 3]
        for layer in token:
            assert len(set(layer["expert_ids"])) == 2 and all(0 <= e < 8 for e in layer["expert_ids"])
            assert math.isclose(sum(layer["weights"]), 1.0, abs_tol=1e-4)
    # every token that went through the model: prompt + all generated but the last, 4 layers x top-2
    assert usage["expert_tokens"] == (usage["prompt_tokens"] + 4) * 4 * 2
    assert len(choice["logprobs"]["top_logprobs"]) == 5
    reply = grpc_stub(server.grpc_target).Complete(grpc_request("import os\n", 5, return_routing=True), timeout=60)
    assert [[list(layer.expert_id) for layer in t.layers] for t in reply.routing] == \
        [[layer["expert_ids"] for layer in t] for t in choice["routing"]]
    assert reply.usage.expert_tokens == usage["expert_tokens"]


def test_health_and_metrics(server):
    assert requests.get(f"{server.base}/health", timeout=30).json()["status"] == "ok"
    text = requests.get(f"{server.base}/metrics", timeout=30).text
    assert "moe_generated_tokens_total" in text and "moe_time_to_first_token_seconds_bucket" in text
    assert 'moe_layer_expert_load_max_over_mean{layer="3"}' in text


def test_admin_load_matrix_and_placement(server):
    import time

    http_complete(server.base, "import os\n", 4)
    deadline = time.monotonic() + 30  # the router's counters arrive with its next report (every 0.5 s)
    body = requests.get(f"{server.base}/admin/load", timeout=30).json()
    while not (body["load"] and sum(body["load"]["total_tokens"][0])) and time.monotonic() < deadline:
        time.sleep(0.2)
        body = requests.get(f"{server.base}/admin/load", timeout=30).json()
    load = body["load"]
    assert load["layers"] == [0, 1, 2, 3] and len(load["ema_tokens_per_step"][0]) == 8
    assert sum(load["total_tokens"][0]) > 0
    workers = body["placement"]["workers"]
    assert len(workers) == 2 and sorted(tuple(s) for w in workers for s in w) == \
        [(layer, e) for layer in range(4) for e in range(8)]


def _post(server, body, headers=None, raw=None):
    headers = headers or {"Content-Type": "application/json"}
    data = raw if raw is not None else json.dumps(body)
    return requests.post(f"{server.base}/v1/completions", data=data, headers=headers, timeout=60)


BAD_HTTP = [
    ("not json", None, "{not json", 400, None),
    ("json array", None, "[1, 2]", 400, None),
    ("max_tokens 0", {"prompt": "x", "max_tokens": 0}, None, 400, "max_tokens"),
    ("negative temperature", {"prompt": "x", "temperature": -1}, None, 400, "temperature"),
    ("NaN temperature", None, '{"prompt": "x", "temperature": NaN}', 400, "temperature"),
    ("top_p 0", {"prompt": "x", "top_p": 0}, None, 400, "top_p"),
    ("top_p 1.5", {"prompt": "x", "top_p": 1.5}, None, 400, "top_p"),
    ("top_k -1", {"prompt": "x", "top_k": -1}, None, 400, "top_k"),
    ("huge n", {"prompt": "x", "n": 1000}, None, 400, "n"),
    ("negative token id", {"prompt": [-1]}, None, 400, "prompt"),
    ("token id >= vocab", {"prompt": [4096]}, None, 400, "prompt"),
    ("empty prompt", {"prompt": ""}, None, 400, "prompt"),
    ("missing prompt", {"max_tokens": 3}, None, 400, "prompt"),
    ("over the context", {"prompt": "x", "max_tokens": 100000}, None, 400, "max_tokens"),
    ("prompt alone over the context", {"prompt": [1] * 5000, "max_tokens": 1}, None, 400, "prompt"),
    ("unknown model", {"prompt": "x", "model": "gpt-9"}, None, 404, "model"),
]


@pytest.mark.parametrize("name,body,raw,status,param", BAD_HTTP, ids=[b[0] for b in BAD_HTTP])
def test_bad_http_requests(server, name, body, raw, status, param):
    r = _post(server, body, raw=raw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param
    assert "Traceback" not in r.text and "/work/" not in r.text


def test_wrong_content_type_and_huge_bad_value(server):
    r = _post(server, None, headers={"Content-Type": "text/plain"}, raw='{"prompt": "x"}')
    assert r.status_code == 415
    gzipped = _post(server, None, raw=gzip.compress(b'{"prompt": "x"}'),
                    headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert gzipped.status_code == 415 and "Content-Encoding" in gzipped.json()["error"]["message"]
    r = _post(server, {"prompt": "x", "model": "m" * 100_000})
    assert r.status_code == 404 and len(r.content) < 2000


BAD_GRPC = [
    ("max_tokens 0", dict(prompt="x", max_tokens=0), grpc.StatusCode.INVALID_ARGUMENT),
    ("temperature nan", dict(prompt="x", temperature=float("nan")), grpc.StatusCode.INVALID_ARGUMENT),
    ("top_p 2", dict(prompt="x", top_p=2.0), grpc.StatusCode.INVALID_ARGUMENT),
    ("top_k -1", dict(prompt="x", top_k=-1), grpc.StatusCode.INVALID_ARGUMENT),
    ("token id >= vocab", dict(prompt_ids=[5000]), grpc.StatusCode.INVALID_ARGUMENT),
    ("empty prompt", dict(), grpc.StatusCode.INVALID_ARGUMENT),
    ("both prompts", dict(prompt="x", prompt_ids=[1]), grpc.StatusCode.INVALID_ARGUMENT),
    ("unknown model", dict(prompt="x", model="gpt-9"), grpc.StatusCode.NOT_FOUND),
]


@pytest.mark.parametrize("name,fields,code", BAD_GRPC, ids=[b[0] for b in BAD_GRPC])
@pytest.mark.parametrize("method", ["Complete", "Generate"])
def test_bad_grpc_requests(server, name, fields, code, method):
    from protos import moe_serving_pb2 as pb

    call = getattr(grpc_stub(server.grpc_target), method)
    with pytest.raises(grpc.RpcError) as e:
        result = call(pb.CompleteRequest(**fields), timeout=60)
        list(result) if method == "Generate" else result
    assert e.value.code() == code
    assert "Traceback" not in (e.value.details() or "")
