"""An expert worker's gRPC server: validates every request, then computes or moves copies.

Shapes: N rows, D hidden. Forward and ForwardStream requests go through the rules of
deployments/experts/validate.py (INVALID_ARGUMENT when malformed, FAILED_PRECONDITION
when the worker holds no copy of an expert) before anything is computed; a stream's
bytes are counted as they arrive, against the shape its header states.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Protocol

import grpc

from deployments.experts.compute import ExpertCompute
from deployments.experts.transport.grpc import from_proto, receive_into, stream_reply, to_proto
from deployments.experts.validate import REFUSALS, BadRequest, NoRoom, check_experts, nbytes_of, refusal
from protos import expert_pb2, expert_pb2_grpc


def _stream_data(chunks) -> Iterator[bytes]:
    for chunk in chunks:
        if chunk.WhichOneof("part") != "data":
            raise BadRequest("a ForwardStream sends its header once, then only data")
        yield chunk.data


def _receive(hidden, chunks):
    """The stream's rows, in a tensor of the shape its header states."""
    try:
        return receive_into(hidden.shape, hidden.dtype, _stream_data(chunks))
    except RuntimeError as e:  # the stated shape cannot be allocated here
        raise NoRoom(type(e).__name__) from e


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

    @contextlib.contextmanager
    def _refusals(self, context):
        """Aborts the call with the refusal's status (validate.REFUSALS) when the block refuses it."""
        try:
            yield
        except tuple(REFUSALS) as e:
            status, message = refusal(self.name, e)
            context.abort(grpc.StatusCode[status], message)

    def _check(self, request, nbytes: int) -> None:
        self.compute.check(layer=request.layer, shape=list(request.hidden.shape), dtype=request.hidden.dtype,
                           nbytes=nbytes, expert_ids=list(request.expert_id), counts=list(request.count))

    def Forward(self, request, context):
        with self._refusals(context):
            self._check(request, len(request.hidden.data))
        out = self.compute.run(request.layer, from_proto(request.hidden), list(request.expert_id),
                               list(request.count))
        return expert_pb2.ForwardReply(output=to_proto(out))

    def ForwardStream(self, request_iterator, context):
        with self._refusals(context):
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("part") != "header":
                raise BadRequest("a ForwardStream starts with its header")
            request = first.header
            self._check(request, nbytes_of(request.hidden.shape, request.hidden.dtype))
            rows = _receive(request.hidden, request_iterator)
        yield from stream_reply(self.compute.run(request.layer, rows, list(request.expert_id), list(request.count)))

    def LoadCopies(self, request, context):
        with self._refusals(context):
            experts = check_experts(self.cfg, request.layer, request.expert_id)
        return expert_pb2.CopiesReply(bytes_loaded=self.copies.load_copies(experts))

    Load = LoadCopies  # deprecated on the wire (expert.proto): what a client built before the rename calls

    def Retire(self, request, context):
        with self._refusals(context):
            experts = check_experts(self.cfg, request.layer, request.expert_id)
        self.copies.retire(experts)
        return expert_pb2.CopiesReply()

    def Health(self, request, context):
        return expert_pb2.HealthReply(worker=self.name,
                                      experts=[f"{layer}:{e}" for layer, e in self.copies.held()])
