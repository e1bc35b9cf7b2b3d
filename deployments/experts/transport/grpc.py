"""Other node: gRPC with raw tensor bytes, one call per (layer, worker) per step.

Shapes: N rows, D hidden. Tensors cross in their own dtype (fp32 on CPU, bf16/fp16 on
GPU). A call whose rows fit in one chunk (CHUNK_BYTES) is one unary Forward; a larger
one is a ForwardStream: the header, then the rows in chunks of CHUNK_BYTES, answered
the same way, so no payload size fails (an 8192-token prefill at Qwen3-30B-A3B sizes
is 65536 rows, 512 MiB). Chunks are written into a tensor allocated once for the
whole payload as they arrive: never joined into one bytes object, never copied again.
"""
from __future__ import annotations

import itertools
import warnings
from concurrent import futures
from typing import Iterable, Iterator, Sequence

import grpc
import torch
from torch import Tensor

from deployments.experts.auth import SecretInterceptor, call_metadata
from deployments.experts.validate import DTYPES, NAMES, BadRequest
from protos import expert_pb2, expert_pb2_grpc

CHUNK_BYTES = 4 << 20  # a few MiB: large enough that per-message costs vanish, small enough to stream
GRPC_MAX_MESSAGE_BYTES = CHUNK_BYTES + (1 << 20)  # a chunk, or a unary call of up to a chunk, plus its header
CHANNEL_OPTIONS = [("grpc.max_send_message_length", GRPC_MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE_BYTES)]
# The received bytes are only read (the expert matmul copies them into its output), so a
# read-only view is safe and saves a copy per call.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


def wire(t: Tensor) -> Tensor:
    """The tensor as it crosses: on the CPU, contiguous, in a dtype the data plane carries."""
    t = t.detach()
    return (t if t.dtype in NAMES else t.float()).to("cpu").contiguous()


def to_proto(t: Tensor) -> expert_pb2.Tensor:
    t = wire(t)
    return expert_pb2.Tensor(data=t.view(torch.uint8).numpy().tobytes(), shape=list(t.shape), dtype=NAMES[t.dtype])


def from_proto(p: expert_pb2.Tensor) -> Tensor:
    """A view of the message's bytes (no copy); callers validate shape and size first."""
    if p.dtype not in DTYPES:
        raise ValueError(f"unsupported tensor dtype {p.dtype!r}")
    if not p.data:
        return torch.empty(tuple(p.shape), dtype=DTYPES[p.dtype])
    return torch.frombuffer(p.data, dtype=DTYPES[p.dtype]).reshape(tuple(p.shape))


def chunks(t: Tensor) -> Iterator[bytes]:
    """A wire tensor's bytes, CHUNK_BYTES at a time (each copied once, into its message)."""
    flat = memoryview(t.reshape(-1).view(torch.uint8).numpy())
    for start in range(0, len(flat), CHUNK_BYTES):
        yield bytes(flat[start:start + CHUNK_BYTES])


def receive_into(shape: Sequence[int], dtype: str, parts: Iterable[bytes]) -> Tensor:
    """A tensor of `shape` filled from `parts` in order; BadRequest unless they are exactly its bytes."""
    out = torch.empty(tuple(shape), dtype=DTYPES[dtype])
    flat = out.view(-1).view(torch.uint8)
    filled = 0
    for data in parts:
        if filled + len(data) > flat.numel():
            raise BadRequest(f"more than the {flat.numel()} bytes of a {list(shape)} {dtype} tensor")
        if data:
            flat[filled:filled + len(data)] = torch.frombuffer(data, dtype=torch.uint8)
        filled += len(data)
    if filled != flat.numel():
        raise BadRequest(f"{filled} bytes for a {list(shape)} {dtype} tensor of {flat.numel()}")
    return out


def stream_reply(out: Tensor) -> Iterator[expert_pb2.ForwardReplyChunk]:
    out = wire(out)
    yield expert_pb2.ForwardReplyChunk(header=expert_pb2.Tensor(shape=list(out.shape), dtype=NAMES[out.dtype]))
    for data in chunks(out):
        yield expert_pb2.ForwardReplyChunk(data=data)


def _experts_request(experts: list[tuple[int, int]]) -> expert_pb2.ExpertsRequest:
    return expert_pb2.ExpertsRequest(layer=[e[0] for e in experts], expert_id=[e[1] for e in experts])


class GrpcTransport:
    """A client of one worker's data plane. Blocking calls: the router runs them on its
    own thread pool (grpc's `.future()` starts a thread per call, ~2.8 ms measured here)."""

    def __init__(self, address: str, secret: str):
        self.address = address
        self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.stub = expert_pb2_grpc.ExpertServiceStub(self.channel)
        self.metadata = call_metadata(secret)

    def forward(self, layer: int, rows: Tensor, expert_ids: list[int], counts: list[int], timeout: float) -> Tensor:
        rows = wire(rows)
        if rows.numel() * rows.element_size() > CHUNK_BYTES:
            return self._stream(layer, rows, expert_ids, counts, timeout)
        req = expert_pb2.ForwardRequest(layer=layer, hidden=to_proto(rows), expert_id=expert_ids, count=counts)
        return from_proto(self.stub.Forward(req, timeout=timeout, metadata=self.metadata).output)

    def _stream(self, layer: int, rows: Tensor, expert_ids: list[int], counts: list[int], timeout: float) -> Tensor:
        header = expert_pb2.ForwardRequest(layer=layer, expert_id=expert_ids, count=counts,
                                           hidden=expert_pb2.Tensor(shape=list(rows.shape), dtype=NAMES[rows.dtype]))
        requests = itertools.chain([expert_pb2.ForwardChunk(header=header)],
                                   (expert_pb2.ForwardChunk(data=data) for data in chunks(rows)))
        replies = self.stub.ForwardStream(requests, timeout=timeout, metadata=self.metadata)
        try:
            first = next(replies)
            if first.WhichOneof("part") != "header":
                raise BadRequest("a ForwardStream reply starts with its header")
            return receive_into(first.header.shape, first.header.dtype, (r.data for r in replies))
        finally:
            replies.cancel()  # a no-op once the stream ended; stops it when we gave up early

    def load_copies(self, experts: list[tuple[int, int]], timeout: float = 600) -> int:
        """Have the worker load copies of these experts (it keeps serving meanwhile); bytes read."""
        return self.stub.LoadCopies(_experts_request(experts), timeout=timeout, metadata=self.metadata).bytes_loaded

    def retire(self, experts: list[tuple[int, int]], timeout: float = 60) -> None:
        self.stub.Retire(_experts_request(experts), timeout=timeout, metadata=self.metadata)

    def health(self, timeout: float = 2) -> list[tuple[int, int]]:
        """The experts the worker holds (raises if it does not answer)."""
        reply = self.stub.Health(expert_pb2.HealthRequest(), timeout=timeout, metadata=self.metadata)
        return [tuple(int(x) for x in s.split(":")) for s in reply.experts]

    def close(self) -> None:
        self.channel.close()


def serve(servicer: expert_pb2_grpc.ExpertServiceServicer, host: str, secret: str) -> tuple[grpc.Server, int]:
    """Serve on host:<free port>; a few threads: calls for different layers never overlap in one step."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=CHANNEL_OPTIONS,
                         interceptors=[SecretInterceptor(secret)])
    expert_pb2_grpc.add_ExpertServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"{host}:0")
    server.start()
    return server, port
