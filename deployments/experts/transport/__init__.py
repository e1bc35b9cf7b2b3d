"""Transports of the expert data plane, chosen per worker by where it runs.

| where the worker is, seen from the router | transport | module |
|---|---|---|
| same process | a direct call (`LocalExperts`, no transport) | cluster/model/experts.py |
| same node, router and worker on GPUs | CUDA IPC: device-to-device copies (shm once a mapping fails) | cuda_ipc.py |
| same node | shared memory, a control message on a Unix socket | shm.py |
| another node, or no local endpoint | gRPC, streamed in chunks | grpc.py |

Every transport authenticates with the application's shared secret and has every
request validated by deployments/experts/validate.py before a worker computes.
LoadCopies / Retire / Health stay on gRPC (controller → worker).
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

import torch

from cluster.placement import WorkerRef
from deployments.experts.compute import ExpertCompute
from deployments.experts.transport.cuda_ipc import CudaIpcSession, CudaIpcTransport, MappingFailed
from deployments.experts.transport.grpc import GrpcTransport
from deployments.experts.transport.local_server import LocalServer
from deployments.experts.transport.local_socket import MODE_CUDA_IPC, MODE_SHM
from deployments.experts.transport.shm import ShmSession, ShmTransport

log = logging.getLogger("ray.serve")
PREFERENCES = ("auto", "grpc", "shm", "cuda_ipc")


def choose(ref: WorkerRef, *, node_id: str, device: str, prefer: str = "auto",
           cuda_available: Callable[[], bool] = torch.cuda.is_available) -> str:
    """The fastest transport that reaches `ref` from a router on `node_id` computing on `device`.
    `prefer` caps it (grpc < shm < cuda_ipc); what cannot work is never chosen: another node (or a
    worker without a local endpoint) always gets grpc, and cuda_ipc needs CUDA on both sides."""
    if prefer not in PREFERENCES:
        raise ValueError(f"data_plane_transport {prefer!r} is not one of {PREFERENCES}")
    same_node = bool(node_id) and ref.node_id == node_id and bool(ref.local_socket)
    if not same_node or prefer == "grpc":
        return "grpc"
    both_on_gpus = device.startswith("cuda") and ref.device.startswith("cuda")
    if prefer in ("auto", "cuda_ipc") and both_on_gpus and cuda_available():
        return "cuda_ipc"
    return "shm"


def connect(ref: WorkerRef, *, node_id: str, device: str, secret: str, prefer: str = "auto"):
    """A transport to `ref` (the Transport protocol of deployments/experts/remote.py)."""
    kind = choose(ref, node_id=node_id, device=device, prefer=prefer)
    log.info("expert worker at %s (generation %d): %s", ref.address, ref.generation, kind)
    if kind == "cuda_ipc":
        return CudaIpcOrShm(ref, secret, device)
    if kind == "shm":
        return ShmTransport(ref.address, ref.local_socket, secret)
    return GrpcTransport(ref.address, secret)


class CudaIpcOrShm:
    """CUDA IPC to one worker until its buffers cannot be mapped here (no peer access between the two
    GPUs, which the router cannot ask about beforehand), then shared memory to it for good."""

    def __init__(self, ref: WorkerRef, secret: str, device: str):
        self.address, self.ref, self.secret = ref.address, ref, secret
        self._lock = threading.Lock()
        self.transport: CudaIpcTransport | ShmTransport = CudaIpcTransport(ref.address, ref.local_socket, secret,
                                                                           device)

    def forward(self, layer: int, rows: torch.Tensor, expert_ids, counts, timeout: float) -> torch.Tensor:
        try:
            return self.transport.forward(layer, rows, expert_ids, counts, timeout)
        except MappingFailed as e:
            with self._lock:  # two micro-batches may both fail: one switch
                if isinstance(self.transport, CudaIpcTransport):
                    log.warning("expert worker at %s: CUDA IPC cannot map its buffers (%s); shared memory "
                                "from now on", self.address, e.message)
                    failed, self.transport = self.transport, ShmTransport(self.address, self.ref.local_socket,
                                                                          self.secret)
                    failed.close()
        return self.transport.forward(layer, rows, expert_ids, counts, timeout)  # shm: on the host (the caller moves it)

    @property
    def kind(self) -> str:
        return "cuda_ipc" if isinstance(self.transport, CudaIpcTransport) else "shm"

    def close(self) -> None:
        self.transport.close()


def serve_local(compute: ExpertCompute, secret: str) -> LocalServer:
    """The Unix-socket server a worker runs beside its gRPC server (shm, and cuda_ipc on a GPU)."""
    return LocalServer(compute.name, secret, {MODE_SHM: lambda: ShmSession(compute),
                                              MODE_CUDA_IPC: lambda: CudaIpcSession(compute)})
