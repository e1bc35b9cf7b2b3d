"""The public gRPC API (protos/moe_serving.proto) mapped onto the same engine calls as HTTP."""
from __future__ import annotations

import grpc

from cluster.engine import InvalidRequest, SamplingParams
from protos import moe_serving_pb2 as pb


def _opt(request, name: str, default):
    return getattr(request, name) if request.HasField(name) else default


def prompt_of(request: pb.CompleteRequest) -> str | list[int]:
    if request.prompt and request.prompt_ids:
        raise InvalidRequest("prompt: give either prompt or prompt_ids, not both", "prompt")
    return list(request.prompt_ids) if request.prompt_ids else request.prompt


def sampling_params(request: pb.CompleteRequest) -> SamplingParams:
    return SamplingParams(max_tokens=_opt(request, "max_tokens", 16), temperature=_opt(request, "temperature", 1.0),
                          top_p=_opt(request, "top_p", 1.0), top_k=_opt(request, "top_k", 0),
                          seed=_opt(request, "seed", None), stop=tuple(request.stop),
                          logprobs=_opt(request, "logprobs", None), return_routing=request.return_routing)


def usage(prompt_tokens: int, completion_tokens: int, expert_tokens: int) -> pb.Usage:
    return pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                    total_tokens=prompt_tokens + completion_tokens, expert_tokens=expert_tokens)


def token_logprob(s) -> pb.TokenLogprob:
    return pb.TokenLogprob(token_id=s.token_id, logprob=s.logprob or 0.0,
                           top_token_ids=[t for t, _ in s.top_logprobs], top_logprobs=[lp for _, lp in s.top_logprobs])


def token_routing(routing) -> pb.TokenRouting:
    return pb.TokenRouting(layers=[pb.LayerRouting(layer=layer, expert_id=list(ids), weight=list(ws))
                                   for layer, ids, ws in routing])


STATUS = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
          404: grpc.StatusCode.NOT_FOUND, 408: grpc.StatusCode.DEADLINE_EXCEEDED,
          503: grpc.StatusCode.RESOURCE_EXHAUSTED, 500: grpc.StatusCode.INTERNAL}


def api_key_of(metadata) -> str | None:
    """The key a gRPC client sent: `authorization: Bearer KEY` or `x-api-key: KEY`."""
    for key, value in metadata or ():
        if key == "authorization" and value.startswith("Bearer "):
            return value[len("Bearer "):]
        if key == "x-api-key":
            return value
    return None
