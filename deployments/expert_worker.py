"""Expert worker: a Ray Serve replica holding some (layer, expert_id) slots, served over gRPC."""
from __future__ import annotations

import asyncio
import logging

import torch
from ray import serve

from cluster.loader import load_experts, open_model
from cluster.model.experts import LocalExperts
from deployments.data_plane import ExpertServicer, start_server

log = logging.getLogger("ray.serve")


@serve.deployment(health_check_period_s=5, max_ongoing_requests=16)
class ExpertWorker:
    def __init__(self, model: str, slots: list[list[int]], name: str, host: str, torch_threads: int = 1,
                 device: str = "cpu", service_time_per_token_s: float = 0.0):
        torch.set_num_threads(torch_threads)
        self.device = device  # "cuda" when the config gives workers GPUs (worker.num_gpus > 0)
        self.name = name
        self.ckpt, self.family, self.cfg = open_model(model)
        self.experts = LocalExperts(load_experts(self.ckpt, self.family, self.cfg, [tuple(s) for s in slots],
                                                 device=self.device))
        self.server, port = start_server(ExpertServicer(name, self.experts, self.device, service_time_per_token_s), host)
        self.address = f"{host}:{port}"
        log.info("%s: %d expert slots on %s, data plane at %s", name, len(slots), self.device, self.address)

    def get_address(self) -> str:
        return self.address

    def get_node_id(self) -> str:
        """The Ray node this replica runs on: the router prefers copies on its own node."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def held_slots(self) -> list[list[int]]:
        return [list(s) for s in self.experts.slots()]

    async def load_slots(self, slots: list[list[int]]) -> int:
        """Load more expert copies in the background (partial loading from safetensors) while
        the data plane keeps serving; returns the weight bytes read."""
        wanted = [tuple(s) for s in slots if not self.experts.holds(*s)]
        before = self.ckpt.bytes_read
        loaded = await asyncio.to_thread(load_experts, self.ckpt, self.family, self.cfg, wanted, device=self.device)
        self.experts.add(loaded)
        log.info("%s: loaded %d expert copies", self.name, len(loaded))
        return self.ckpt.bytes_read - before

    def retire_slots(self, slots: list[list[int]]) -> None:
        self.experts.remove([tuple(s) for s in slots])
        log.info("%s: retired %d expert copies", self.name, len(slots))

    def check_health(self) -> None:
        # The data-plane server runs on its own threads; a replica that lost it is unhealthy.
        if self.server is None:
            raise RuntimeError("data-plane server is down")

    def __del__(self):
        if getattr(self, "server", None) is not None:
            self.server.stop(grace=1)
