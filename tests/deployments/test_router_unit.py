"""The router without Serve: it speaks the engine's errors and the ingress alone makes the client's
(the Serve hop is a pickle round trip wrapped as Ray wraps a replica's exception); its admission
counts in-flight work in the engine."""
import pickle

import grpc
import pytest
from ray.exceptions import RayActorError, RayTaskError

from cluster.engine import InvalidRequest
from cluster.engine.async_engine import EngineDeadError, SequenceFailed
from deployments.api.errors import classify
from deployments.experts.remote import ExpertUnavailable
from deployments.messages import RouterError
from deployments.router import engine_error


def across_serve(error: Exception) -> Exception:
    """As the ingress receives what a router raised."""
    return RayTaskError("generate", "traceback", pickle.loads(pickle.dumps(error))).as_instanceof_cause()


# what a router raises -> (status, message or part of it, OpenAI type, gRPC code)
CASES = [
    (RouterError("stopped", "this router's engine stopped; retry the request"),
     503, "this router's engine stopped; retry the request", "service_unavailable_error", grpc.StatusCode.UNAVAILABLE),
    (RouterError("uncovered", "2 expert(s) have no live copy right now (worker down); retry shortly"),
     503, "2 expert(s) have no live copy", "service_unavailable_error", grpc.StatusCode.UNAVAILABLE),
    (RouterError("full", "server overloaded: 3 requests in progress; retry later"),
     503, "server overloaded: 3 requests", "overloaded_error", grpc.StatusCode.RESOURCE_EXHAUSTED),
    (RouterError("internal", "internal error"), 500, "internal error", "server_error", grpc.StatusCode.INTERNAL),
    (InvalidRequest("max_tokens: exceeds the KV cache (64 tokens)", "max_tokens"),
     400, "exceeds the KV cache", "invalid_request_error", grpc.StatusCode.INVALID_ARGUMENT),
    (ExpertUnavailable("layer 1 expert 3: no live copy"), 503, "generation failed: layer 1 expert 3",
     "service_unavailable_error", grpc.StatusCode.UNAVAILABLE),
    (EngineDeadError("boom"), 503, "the router serving this request stopped", "service_unavailable_error",
     grpc.StatusCode.UNAVAILABLE),
    (SequenceFailed("FloatingPointError: boom"), 500, "generation failed for this request: FloatingPointError",
     "server_error", grpc.StatusCode.INTERNAL),
]


@pytest.mark.parametrize("raised,status,message,openai_type,code", CASES)
def test_the_ingress_makes_the_clients_error_from_the_routers(raised, status, message, openai_type, code):
    error = classify(across_serve(engine_error(raised)))
    assert (error.status, error.body()["error"]["type"], error.grpc_code) == (status, openai_type, code)
    assert message in error.message
    assert error.headers() == {"Retry-After": "1"} if status == 503 else error.headers() == {}
    assert error.param == getattr(raised, "param", None)


def test_anything_else_leaves_the_router_without_its_text():
    assert engine_error(InvalidRequest("x")).__class__ is InvalidRequest  # the engine's own: as it is
    hidden = engine_error(KeyError("/secret/path"))
    assert (hidden.kind, str(hidden)) == ("internal", "internal error")
    stopped = engine_error(RayActorError())
    assert stopped.kind == "stopped" and classify(across_serve(stopped)).status == 503


def test_the_router_does_not_speak_http():
    import ast
    from pathlib import Path

    import deployments.router as router

    tree = ast.parse(Path(router.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(m.startswith("deployments.api") for m in imported), imported


def test_the_router_admits_up_to_its_queue_limit_counting_in_the_engine(checkpoint_factory):
    """Admission without Serve: the router's checks over a real engine; its in-flight work is the
    engine's `admitted` (one count per process), released when a request ends or is cancelled."""
    import asyncio
    from types import SimpleNamespace

    from cluster.engine import LLMEngine, SamplingParams
    from cluster.engine.async_engine import AsyncEngine
    from deployments.messages import GenerateRequest
    from deployments.router import Router

    engine = LLMEngine.from_pretrained(str(checkpoint_factory("mixtral")), max_model_len=64, max_num_seqs=1)
    router = Router.__new__(Router)  # what __init__ builds from Serve, without Serve
    router.cfg = SimpleNamespace(max_num_seqs=1, max_queued_requests=1, stream_interval=1)
    router.remote = None
    long = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)

    async def run():
        router.engine = AsyncEngine(engine, step_delay_s=0.01)
        try:
            held = [router.generate(GenerateRequest([5, 17, 33], long)) for _ in range(2)]
            assert [await call.__anext__() for call in held] == [[], []]  # 1 running + 1 queued
            assert router.engine.admitted == 2
            with pytest.raises(RouterError) as full:
                await router.generate(GenerateRequest([5, 17], long)).__anext__()
            bad = GenerateRequest([10**9], SamplingParams(max_tokens=2))
            for call in held:
                await call.aclose()  # the ingress cancelled: released, the engine aborts it
            with pytest.raises(InvalidRequest):  # the engine's own error, as it is
                await router.generate(bad).__anext__()
            done = [o async for batch in router.generate(GenerateRequest([5, 17], long)) for o in batch]
            return full.value, done, router.engine.admitted
        finally:
            router.engine.shutdown()

    full, done, admitted = asyncio.run(run())
    assert full.kind == "full" and str(full) == "server overloaded: 2 requests in progress; retry later"
    assert classify(across_serve(full)).body()["error"]["type"] == "overloaded_error"
    assert len(done) == 40 and done[-1].finish_reason == "length" and admitted == 0
