"""Expert workers: Ray Serve replicas holding copies of experts, served over the data plane.

`ExpertWorker`: one deployment per initial-table entry, started with its experts.
`ExpertPoolWorker`: the autoscaled pool; replicas start empty, register with the
placement controller, get copies of hot experts, and hand them back before they stop.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time

import ray
import torch

from cluster.loader import load_experts, open_model
from cluster.model.experts import LocalExperts
from cluster.precision import resolve_dtype
from deployments.experts.compute import ExpertCompute
from deployments.experts.servicer import ExpertServicer
from deployments.experts.transport import serve_local
from deployments.experts.transport.grpc import GrpcTransport
from deployments.experts.transport.grpc import serve as serve_data_plane

log = logging.getLogger("ray.serve")


class ExpertHost:
    """Loads its experts (partial loading: only their bytes are read) and serves them: over gRPC
    (other nodes; Load / Retire / Health) and a Unix socket (same-node transports)."""

    def __init__(self, model: str, experts: list[list[int]], name: str, host: str, secret: str,
                 torch_threads: int = 1, device: str = "cpu", service_time_per_token_s: float = 0.0,
                 dtype: str = "auto", tier: str = ""):
        torch.set_num_threads(torch_threads)
        self.tier = tier  # the expert tier it serves (routers weigh its copies by it)
        self.device = device  # "cuda" when the config gives workers GPUs (worker.num_gpus > 0)
        self.name = name
        self.ckpt, self.family, self.cfg = open_model(model)
        self.dtype = resolve_dtype(dtype, device, self.cfg.checkpoint_dtype)
        self.experts = LocalExperts.stacked_by_layer(
            [tuple(e) for e in experts],
            lambda pairs: load_experts(self.ckpt, self.family, self.cfg, pairs, dtype=self.dtype, device=self.device))
        self.compute = ExpertCompute(name, self.cfg, self.experts, self.device, service_time_per_token_s)
        self.server, port = serve_data_plane(ExpertServicer(self.compute, self._load_copies), host, secret)
        self.local = serve_local(self.compute, secret)
        self.address = f"{host}:{port}"
        self.probe = GrpcTransport(self.address, secret)
        log.info("%s: %d expert copies (%d bytes, %s) on %s, data plane at %s and %s", name, len(experts),
                 sum(w.nbytes for w in self.experts.experts.values()), self.dtype, self.device, self.address,
                 self.local.path)
        if device.startswith("cuda"):  # expandable segments are shared as fds, which CUDA IPC may not map
            log.info("%s: PYTORCH_CUDA_ALLOC_CONF=%s", name, os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""))

    def _load_copies(self, experts: list[tuple[int, int]]) -> int:
        """Loading more copies (the data plane's Load, on its own thread, while it keeps serving)."""
        before = self.ckpt.bytes_read
        self.experts.add(load_experts(self.ckpt, self.family, self.cfg, experts, dtype=self.dtype, device=self.device))
        log.info("%s: loaded %d expert copies", self.name, len(experts))
        return self.ckpt.bytes_read - before

    def get_address(self) -> str:
        return self.address

    def get_node_id(self) -> str:
        """The Ray node this replica runs on: routers prefer copies on their own node."""
        return ray.get_runtime_context().get_node_id()

    def get_endpoints(self) -> dict[str, str]:
        """Where and how routers reach this replica: the WorkerRef fields that pick a transport."""
        return {"address": self.address, "node_id": self.get_node_id(), "local_socket": self.local.path,
                "device": self.device, "tier": self.tier}

    def stop_serving(self) -> None:
        self.server.stop(grace=1)
        self.local.close()

    def check_health(self) -> None:
        """Serve's liveness probe: the data-plane server must answer (a replica that lost it is replaced)."""
        self.probe.health(timeout=5)


class ExpertWorker(ExpertHost):
    """Serve deployment (options applied in deployments/app.py)."""

    def __del__(self):
        if getattr(self, "local", None) is not None:
            self.stop_serving()


class ExpertPoolWorker(ExpertHost):
    """Scaled by Serve between the pool's min and max on its own load: `record_autoscaling_stats`
    reports the fraction of time spent computing experts (and the target);
    `deployments.pool_policy.scale_on_busy` decides."""

    def __init__(self, model: str, controller, build_id: str, host: str, secret: str, torch_threads: int = 1,
                 device: str = "cpu", service_time_per_token_s: float = 0.0, target_busy: float = 0.6,
                 dtype: str = "auto"):
        super().__init__(model, [], "expert-pool", host, secret, torch_threads, device, service_time_per_token_s,
                         dtype)
        self.controller, self.build_id, self.target_busy = controller, build_id, target_busy
        self.registered = False
        self._last = (time.monotonic(), 0.0)

    async def _register(self) -> None:
        """Join the table; repeated on every stats call (idempotent), so a restarted controller
        learns of this worker again."""
        try:
            await asyncio.wait_for(self.controller.register_worker.remote(self.get_endpoints(), self.build_id), 10)
            self.registered = True
        except Exception as e:  # noqa: BLE001 - the controller may be starting
            log.info("expert pool: controller not reachable yet (%s)", type(e).__name__)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        await self._register()
        now, busy = time.monotonic(), self.compute.busy_s
        (then, before), self._last = self._last, (now, busy)
        return {"busy": min(1.0, (busy - before) / max(now - then, 1e-6)), "target_busy": self.target_busy}

    async def __del__(self):
        """Serve stops this replica: hand its copies back first (the controller moves any copy
        that would be the last one, switches every router's table, then lets it go)."""
        if getattr(self, "registered", False):
            try:
                await asyncio.wait_for(self.controller.unregister_worker.remote(self.address, self.build_id),
                                       timeout=240)
            except Exception:  # noqa: BLE001 - the controller may be gone too (shutdown)
                log.exception("expert pool: hand-back failed")
        if getattr(self, "local", None) is not None:
            self.stop_serving()
