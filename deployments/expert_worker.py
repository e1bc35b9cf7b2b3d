"""Expert workers: Ray Serve replicas holding (layer, expert_id) slots, served over gRPC.

`ExpertWorker`: one deployment per placement-table entry, started with its slots.
`ExpertPoolWorker`: the autoscaled pool; replicas start empty, register with the
router, get copies of hot experts, and hand them back before they stop.
"""
from __future__ import annotations

import asyncio
import logging
import time

import ray
import torch
from ray import serve

from cluster.loader import load_experts, open_model
from cluster.model.experts import LocalExperts
from deployments.data_plane import ExpertServicer, start_server

log = logging.getLogger("ray.serve")


class _ExpertHost:
    def __init__(self, model: str, slots: list[list[int]], name: str, host: str, torch_threads: int = 1,
                 device: str = "cpu", service_time_per_token_s: float = 0.0):
        torch.set_num_threads(torch_threads)
        self.device = device  # "cuda" when the config gives workers GPUs (worker.num_gpus > 0)
        self.name = name
        self.ckpt, self.family, self.cfg = open_model(model)
        self.experts = LocalExperts(load_experts(self.ckpt, self.family, self.cfg, [tuple(s) for s in slots],
                                                 device=self.device))
        self.servicer = ExpertServicer(name, self.experts, self.device, service_time_per_token_s, self._load)
        self.server, port = start_server(self.servicer, host)
        self.address = f"{host}:{port}"
        log.info("%s: %d expert slots on %s, data plane at %s", name, len(slots), self.device, self.address)

    def _load(self, slots: list[tuple[int, int]]) -> int:
        """Partial loading of more copies (the data plane's Load, on its own thread, while it keeps
        serving); returns bytes read."""
        before = self.ckpt.bytes_read
        self.experts.add(load_experts(self.ckpt, self.family, self.cfg, slots, device=self.device))
        log.info("%s: loaded %d expert copies", self.name, len(slots))
        return self.ckpt.bytes_read - before

    def get_address(self) -> str:
        return self.address

    def get_node_id(self) -> str:
        """The Ray node this replica runs on: the router prefers copies on its own node."""
        return ray.get_runtime_context().get_node_id()

    def check_health(self) -> None:
        # The data-plane server runs on its own threads; a replica that lost it is unhealthy.
        if self.server is None:
            raise RuntimeError("data-plane server is down")


@serve.deployment(health_check_period_s=5, max_ongoing_requests=16)
class ExpertWorker(_ExpertHost):
    def __del__(self):
        if getattr(self, "server", None) is not None:
            self.server.stop(grace=1)


@serve.deployment(health_check_period_s=5, max_ongoing_requests=16)
class ExpertPoolWorker(_ExpertHost):
    """Scaled by Serve between the policy's min and max pool workers, on its own load:
    `record_autoscaling_stats` reports the fraction of time spent computing experts
    (and the policy's target), `deployments.pool_policy.scale_on_busy` decides."""

    def __init__(self, model: str, app_name: str, host: str, torch_threads: int = 1, device: str = "cpu",
                 service_time_per_token_s: float = 0.0, target_busy: float = 0.6):
        super().__init__(model, [], "expert-pool", host, torch_threads, device, service_time_per_token_s)
        self.app_name, self.target_busy = app_name, target_busy
        self.registered = False
        self._last = (time.monotonic(), 0.0)

    async def _register(self) -> None:
        """Join the router's table (it may still be starting: retried on the next stats call)."""
        router = serve.get_deployment_handle("Router", self.app_name)
        try:
            await router.register_worker.remote(self.address, self.get_node_id())
            self.registered = True
        except Exception as e:  # noqa: BLE001 - not up yet
            log.info("expert pool: router not reachable yet (%s)", type(e).__name__)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        if not self.registered:
            await self._register()
        now, busy = time.monotonic(), self.servicer.busy_s
        (then, before), self._last = self._last, (now, busy)
        return {"busy": min(1.0, (busy - before) / max(now - then, 1e-6)), "target_busy": self.target_busy}

    async def __del__(self):
        """Serve stops this replica: hand its copies back (the router moves any copy that
        would be the last one to another worker and stops sending rows here) first."""
        if getattr(self, "registered", False):
            try:
                router = serve.get_deployment_handle("Router", self.app_name)
                await asyncio.wait_for(router.unregister_worker.remote(self.address), timeout=120)
            except Exception:  # noqa: BLE001 - the router may be gone too (shutdown)
                log.exception("expert pool: hand-back failed")
        if getattr(self, "server", None) is not None:
            self.server.stop(grace=1)
