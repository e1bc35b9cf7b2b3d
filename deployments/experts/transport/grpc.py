"""The gRPC transport of the expert data plane: raw tensor bytes in protobuf, one call per
(layer, worker) per step. Used across nodes (and, until faster transports exist, on one node).

Shapes: N rows, D hidden. Tensors cross in their own dtype (fp32 on CPU, bf16/fp16 on GPU).
"""
from __future__ import annotations

import warnings
from concurrent import futures

import grpc
import torch
from torch import Tensor

from deployments.experts.auth import SecretInterceptor, call_metadata
from protos import expert_pb2, expert_pb2_grpc

MAX_MESSAGE = 256 << 20
CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
NAMES = {v: k for k, v in DTYPES.items()}
# The received bytes are only read (the expert matmul copies them into its output), so a
# read-only view is safe and saves a copy per call.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


def to_proto(t: Tensor) -> expert_pb2.Tensor:
    t = t.detach()
    if t.dtype not in NAMES:
        t = t.float()
    t = t.to("cpu").contiguous()
    return expert_pb2.Tensor(data=t.view(torch.uint8).numpy().tobytes(), shape=list(t.shape), dtype=NAMES[t.dtype])


def from_proto(p: expert_pb2.Tensor) -> Tensor:
    """A view of the message's bytes (no copy); callers validate shape and size first."""
    if p.dtype not in DTYPES:
        raise ValueError(f"unsupported tensor dtype {p.dtype!r}")
    if not p.data:
        return torch.empty(tuple(p.shape), dtype=DTYPES[p.dtype])
    return torch.frombuffer(p.data, dtype=DTYPES[p.dtype]).reshape(tuple(p.shape))


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
        req = expert_pb2.ForwardRequest(layer=layer, hidden=to_proto(rows), expert_id=expert_ids, count=counts)
        return from_proto(self.stub.Forward(req, timeout=timeout, metadata=self.metadata).output)

    def load_copies(self, experts: list[tuple[int, int]], timeout: float = 600) -> int:
        """Have the worker load copies of these experts (it keeps serving meanwhile); bytes read."""
        return self.stub.Load(_experts_request(experts), timeout=timeout, metadata=self.metadata).bytes_loaded

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
