"""The public gRPC APIs, as methods of the ingress deployment (Serve's gRPC proxy calls them by name):

- `moe_cluster.serving.MoeServing` (protos/moe_serving.proto): unary `Complete`, streaming
  `Generate`, the same fields, validation and limits as HTTP `/v1/completions`;
- `grpc.health.v1.Health`: `Check` / `Watch` / `List` (liveness: open without the API key).

One status mapper: an ApiError's status becomes its gRPC code (deployments/api/errors.py).
"""
from __future__ import annotations

import asyncio
import logging
import time

from grpc_health.v1 import health_pb2

from deployments import metrics
from deployments.api.api_key import bearer_key, key_matches
from deployments.api.errors import CANCELLED, ApiError, classify, outcome
from deployments.api.responses import ChoiceResult
from deployments.api.schema import CompletionRequest
from protos import moe_serving_pb2 as pb

log = logging.getLogger("ray.serve")
_OPTIONAL = ("max_tokens", "temperature", "top_p", "top_k", "seed", "logprobs")


class AnsweredCallFilter(logging.Filter):
    """Serve turns a gRPC status only from an exception raised after set_code, and logs each such call
    twice with its traceback as a failed request. For a status the client caused (a bad request, a
    missing key, an unknown model: an ApiError below 500) those records say nothing the status and the
    access log do not: they are dropped. Installed on Serve's logger in the ingress replica, which
    serves gRPC itself behind HAProxy (a local start); behind Serve's own proxy (the k8s manifests)
    the proxy process logs such calls too, with its own traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        for _ in range(4):  # Serve wraps ours as gRPCStatusError(original_exception=...) from it
            if exc is None or isinstance(exc, ApiError):
                break
            exc = getattr(exc, "original_exception", None) or exc.__cause__
        return not (isinstance(exc, ApiError) and exc.status < 500)


def quiet_answered_calls(logger: logging.Logger) -> None:
    if not any(isinstance(f, AnsweredCallFilter) for f in logger.filters):
        logger.addFilter(AnsweredCallFilter())


def api_key_of(metadata) -> str | None:
    """The key a gRPC client sent: `authorization: Bearer KEY` or `x-api-key: KEY`."""
    for key, value in metadata or ():
        if key == "authorization" and (presented := bearer_key(value)):
            return presented
        if key == "x-api-key":
            return value
    return None


def to_request(request: pb.CompleteRequest, limit: int) -> CompletionRequest:
    if request.prompt and request.prompt_ids:
        raise ApiError(400, "prompt: give either prompt or prompt_ids, not both", "prompt")
    if len(request.prompt) > limit:
        raise ApiError(413, f"prompt over {limit} characters", "prompt")
    fields = {name: getattr(request, name) for name in _OPTIONAL if request.HasField(name)}
    prompt = list(request.prompt_ids) if request.prompt_ids else request.prompt
    from deployments.api.body import validation_error
    from pydantic import ValidationError

    try:
        return CompletionRequest(model=request.model or None, prompt=prompt, stop=list(request.stop),
                                 return_routing=request.return_routing, **fields)
    except ValidationError as e:
        raise validation_error(e) from None


def _usage(c: ChoiceResult) -> pb.Usage:
    n = len(c.prompt_ids)
    return pb.Usage(prompt_tokens=n, completion_tokens=len(c.token_ids), total_tokens=n + len(c.token_ids),
                    expert_tokens=c.expert_tokens,
                    prompt_tokens_details=pb.PromptTokensDetails(cached_tokens=c.cached_tokens))


def _logprob(s) -> pb.TokenLogprob:
    return pb.TokenLogprob(token_id=s.token_id, logprob=s.logprob or 0.0,
                           top_token_ids=[t for t, _ in s.top_logprobs], top_logprobs=[lp for _, lp in s.top_logprobs])


def _routing(routing) -> pb.TokenRouting:
    return pb.TokenRouting(layers=[pb.LayerRouting(layer=layer, expert_id=list(ids), weight=list(ws))
                                   for layer, ids, ws in routing])


class GrpcServing:
    """Mixin of the ingress deployment (needs `self.cfg`, `self.serving`, `self.cluster_state`)."""

    def _fail(self, grpc_context, e: BaseException):
        error = classify(e)
        if error.status >= 500:  # raised on `from None`: the original is logged here or nowhere
            log.warning("gRPC call → %d: %s: %s", error.status, type(e).__name__, str(e)[:300],
                        exc_info=e if error.status == 500 else None)
        grpc_context.set_code(error.grpc_code)
        grpc_context.set_details(error.message)
        metrics.REQUESTS.labels("grpc", outcome(error)).inc()
        return error  # raised by the caller: Serve turns an exception after set_code into that status

    def _authorize(self, grpc_context) -> None:
        key = self.cfg.resolved_api_key()
        sent = api_key_of(grpc_context.invocation_metadata()) or ""
        if key is not None and not key_matches(sent, key):
            raise ApiError(401, "missing or wrong API key (metadata authorization: Bearer <key>)")

    async def _choices(self, request, grpc_context):
        self._authorize(grpc_context)
        req = to_request(request, self.cfg.max_body_bytes)
        self.serving.check_model(req.model)
        return await self.serving.admitted(lambda: self.serving.completion_choices(req))

    async def Complete(self, request: pb.CompleteRequest, grpc_context) -> pb.CompleteReply:
        try:
            [c] = await self.serving.run(await self._choices(request, grpc_context))
        except asyncio.CancelledError:  # the client cancelled the call
            metrics.REQUESTS.labels("grpc", CANCELLED).inc()
            raise
        except Exception as e:  # noqa: BLE001 - every failure is mapped once
            raise self._fail(grpc_context, e) from None
        metrics.REQUESTS.labels("grpc", "ok").inc()
        return pb.CompleteReply(id=f"cmpl-{time.time_ns()}", text=c.text, token_ids=c.token_ids,
                                finish_reason=c.finish_reason, usage=_usage(c),
                                logprobs=[_logprob(s) for s in c.logprobs], routing=[_routing(r) for r in c.routing])

    async def Generate(self, request: pb.CompleteRequest, grpc_context):
        rid = f"cmpl-{time.time_ns()}"
        try:
            [choice] = await self._choices(request, grpc_context)
            result = ChoiceResult(0, choice.prompt_ids)
            async for _, batch in self.serving.stream([choice]):
                for o in batch:
                    result.add(o)
                    yield self._reply(rid, o, result)
        except (asyncio.CancelledError, GeneratorExit):  # the client cancelled the stream
            metrics.REQUESTS.labels("grpc", CANCELLED).inc()
            raise
        except Exception as e:  # noqa: BLE001 - after a stream started too: the status ends it
            raise self._fail(grpc_context, e) from None
        metrics.REQUESTS.labels("grpc", "ok").inc()

    @staticmethod
    def _reply(rid: str, o, result: ChoiceResult) -> pb.GenerateReply:
        reply = pb.GenerateReply(id=rid, text_delta=o.text_delta, token_id=o.token_id or 0,
                                 finish_reason=o.finish_reason or "")
        if o.sampled is not None and o.sampled.logprob is not None:
            reply.logprob.CopyFrom(_logprob(o.sampled))
        if o.routing is not None:
            reply.routing.CopyFrom(_routing(o.routing))
        if o.finish_reason:
            reply.usage.CopyFrom(_usage(result))
        return reply

    # -- grpc.health.v1 ------------------------------------------------------------------------
    def _health(self) -> health_pb2.HealthCheckResponse:
        ready = self.cluster_state.get("ready", False)
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)

    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context) -> health_pb2.HealthCheckResponse:
        return self._health()

    async def Watch(self, request: health_pb2.HealthCheckRequest, grpc_context):
        yield self._health()

    async def List(self, request, grpc_context) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(statuses={"": self._health(),
                                                       "moe_cluster.serving.MoeServing": self._health()})
