"""One expert worker, however it is started: the Serve replicas (experts/worker.py), the
standalone process (deployments/standalone_worker.py) and the benchmarks all build an
`ExpertHost` from a frozen `WorkerSpec`, passed by keyword, so their set-up cannot drift.

No Ray here (a standalone worker and the unit tests run without it): the caller says which
node the host is on (`node_id`, "" when it does not know).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from cluster.loader import load_experts, open_model
from cluster.model.experts import LocalExperts
from cluster.placement import WorkerRef
from cluster.precision import resolve_dtype
from deployments.experts.compute import ExpertCompute
from deployments.experts.servicer import ExpertServicer
from deployments.experts.transport import serve_local
from deployments.experts.transport.grpc import GrpcTransport
from deployments.experts.transport.grpc import serve as serve_data_plane

log = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class WorkerSpec:
    """What an expert worker is: its model and copies, where and how it computes, how it is reached."""

    model: str  # checkpoint directory
    secret: str  # the data plane's shared secret
    experts: tuple[tuple[int, int], ...] = ()  # (layer, expert_id) copies loaded at start
    name: str = "worker"
    host: str = "127.0.0.1"  # the gRPC server's bind address
    device: str = "cpu"  # "cuda" when the config gives workers GPUs (worker.num_gpus > 0)
    dtype: str = "auto"  # weights and compute (auto: the checkpoint's dtype on a GPU, float32 on a CPU)
    torch_threads: int = 1
    service_time_per_token_s: float = 0.0  # > 0: a device of fixed capacity (benchmarks, fault tests)
    tier: str = ""  # the expert tier it serves (routers weigh its copies by it); "" untiered


class ExpertHost:
    """Loads its experts (partial loading: only their bytes are read) and serves them: over gRPC
    (other nodes; LoadCopies / Retire / Health) and a Unix socket (same-node transports)."""

    def __init__(self, spec: WorkerSpec, *, node_id: str = ""):
        torch.set_num_threads(spec.torch_threads)
        self.spec, self.name, self.device, self.node_id = spec, spec.name, spec.device, node_id
        self.ckpt, self.family, self.cfg = open_model(spec.model)
        self.dtype = resolve_dtype(spec.dtype, spec.device, self.cfg.checkpoint_dtype)
        self.experts = LocalExperts.stacked_by_layer([tuple(e) for e in spec.experts], self._read)
        self.compute = ExpertCompute(spec.name, self.cfg, self.experts, spec.device, spec.service_time_per_token_s)
        self.server, self.port = serve_data_plane(ExpertServicer(self.compute, self), spec.host, spec.secret)
        self.local = serve_local(self.compute, spec.secret)
        self.address = f"{spec.host}:{self.port}"
        self.probe = GrpcTransport(self.address, spec.secret)
        log.info("%s: %d expert copies (%d bytes, %s) on %s, data plane at %s and %s", spec.name, len(spec.experts),
                 sum(w.nbytes for w in self.experts.experts.values()), self.dtype, spec.device, self.address,
                 self.local.path)
        if spec.device.startswith("cuda"):  # expandable segments are shared as fds, which CUDA IPC may not map
            log.info("%s: PYTORCH_CUDA_ALLOC_CONF=%s", spec.name, os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""))

    def _read(self, experts: list[tuple[int, int]]):
        return load_experts(self.ckpt, self.family, self.cfg, experts, dtype=self.dtype, device=self.device)

    def load_copies(self, experts: list[tuple[int, int]]) -> int:
        """Load copies of the experts not held yet (the data plane's LoadCopies, on its own thread, while it
        keeps serving); the weight bytes read."""
        wanted = [e for e in experts if not self.experts.holds(*e)]
        if not wanted:
            return 0
        before = self.ckpt.bytes_read
        self.experts.add(self._read(wanted))
        log.info("%s: loaded %d expert copies", self.name, len(wanted))
        return self.ckpt.bytes_read - before

    def retire(self, experts: list[tuple[int, int]]) -> None:
        self.experts.remove(experts)

    def held(self) -> list[tuple[int, int]]:
        return self.experts.held()

    def endpoints(self) -> dict[str, str]:
        """Where and how routers reach this host: the WorkerRef fields that pick a transport."""
        return {"address": self.address, "node_id": self.node_id, "local_socket": self.local.path,
                "device": self.device, "tier": self.spec.tier}

    def ref(self) -> WorkerRef:
        return WorkerRef(**self.endpoints())

    def check_health(self) -> None:
        """The data-plane server must answer (a Serve replica that lost it is replaced)."""
        self.probe.health(timeout=5)

    def stop(self) -> None:
        self.server.stop(grace=1)
        self.local.close()
