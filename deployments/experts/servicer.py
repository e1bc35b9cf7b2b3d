"""An expert worker's gRPC server: validates every request, then computes or moves copies.

Shapes: N rows, D hidden. Forward and ForwardStream requests go through the rules of
deployments/experts/validate.py (INVALID_ARGUMENT when malformed, FAILED_PRECONDITION
when the worker holds no copy of an expert) before anything is computed; a stream's
bytes are counted as they arrive, against the shape its header states.
"""
from __future__ import annotations

from typing import Iterator, Protocol

import grpc

from deployments.experts.compute import ExpertCompute
from deployments.experts.transport.grpc import from_proto, receive_into, stream_reply, to_proto
from deployments.experts.validate import BadRequest, NotHeld, check_experts, nbytes_of
from protos import expert_pb2, expert_pb2_grpc


def _stream_data(chunks) -> Iterator[bytes]:
    for chunk in chunks:
        if chunk.WhichOneof("part") != "data":
            raise BadRequest("a ForwardStream sends its header once, then only data")
        yield chunk.data


class Copies(Protocol):
    """The copies a worker holds, as its host keeps them (deployments/experts/host.py)."""

    def load_copies(self, experts: list[tuple[int, int]]) -> int:
        """Loads those not held yet; the weight bytes read."""

    def retire(self, experts: list[tuple[int, int]]) -> None:
        ...

    def held(self) -> list[tuple[int, int]]:
        ...


class ExpertServicer(expert_pb2_grpc.ExpertServiceServicer):
    def __init__(self, compute: ExpertCompute, copies: Copies):
        self.compute, self.name, self.cfg, self.copies = compute, compute.name, compute.cfg, copies

    def _check(self, request, nbytes: int, context) -> None:
        try:
            self.compute.check(layer=request.layer, shape=list(request.hidden.shape), dtype=request.hidden.dtype,
                               nbytes=nbytes, expert_ids=list(request.expert_id), counts=list(request.count))
        except BadRequest as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{self.name}: {e}")
        except NotHeld as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))

    def Forward(self, request, context):
        self._check(request, len(request.hidden.data), context)
        out = self.compute.run(request.layer, from_proto(request.hidden), list(request.expert_id),
                               list(request.count))
        return expert_pb2.ForwardReply(output=to_proto(out))

    def ForwardStream(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{self.name}: a ForwardStream starts with its header")
        request = first.header
        self._check(request, nbytes_of(request.hidden.shape, request.hidden.dtype), context)
        try:
            rows = receive_into(request.hidden.shape, request.hidden.dtype, _stream_data(request_iterator))
        except BadRequest as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{self.name}: {e}")
        except RuntimeError as e:  # the stated shape cannot be allocated here
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self.name}: {type(e).__name__}")
        yield from stream_reply(self.compute.run(request.layer, rows, list(request.expert_id), list(request.count)))

    def Load(self, request, context):
        try:
            experts = check_experts(self.cfg, request.layer, request.expert_id)
        except BadRequest as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{self.name}: {e}")
        return expert_pb2.CopiesReply(bytes_loaded=self.copies.load_copies(experts))

    def Retire(self, request, context):
        try:
            experts = check_experts(self.cfg, request.layer, request.expert_id)
        except BadRequest as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{self.name}: {e}")
        self.copies.retire(experts)
        return expert_pb2.CopiesReply()

    def Health(self, request, context):
        return expert_pb2.HealthReply(worker=self.name,
                                      experts=[f"{layer}:{e}" for layer, e in self.copies.held()])
