"""Small HTTP and gRPC clients for the serving tests."""
import json
from concurrent.futures import ThreadPoolExecutor

import grpc
import requests

from protos import moe_serving_pb2 as pb
from protos import moe_serving_pb2_grpc as pb_grpc


def http_complete(base: str, prompt, max_tokens: int, **kw) -> dict:
    r = requests.post(f"{base}/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                                      **kw}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def http_stream(base: str, prompt, max_tokens: int, **kw) -> list[dict]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, **kw}
    with requests.post(f"{base}/v1/completions", json=body, stream=True, timeout=120) as r:
        assert r.status_code == 200, r.text
        events = [line[len(b"data: "):] for line in r.iter_lines() if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    return [json.loads(e) for e in events[:-1]]


def grpc_stub(target: str) -> pb_grpc.MoeServingStub:
    return pb_grpc.MoeServingStub(grpc.insecure_channel(target))


def grpc_request(prompt, max_tokens: int, **kw) -> pb.CompleteRequest:
    ids = {"prompt_ids": prompt} if isinstance(prompt, list) else {"prompt": prompt}
    return pb.CompleteRequest(max_tokens=max_tokens, temperature=0, **ids, **kw)


def concurrently(fn, items):
    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(fn, items))
