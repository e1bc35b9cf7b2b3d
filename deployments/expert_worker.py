"""Expert worker: a Ray Serve replica holding some (layer, expert_id) slots, served over gRPC."""
from __future__ import annotations

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
                 device: str = "cpu"):
        torch.set_num_threads(torch_threads)
        self.device = device  # "cuda" when the config gives workers GPUs (worker.num_gpus > 0)
        ckpt, family, cfg = open_model(model)
        experts = LocalExperts(load_experts(ckpt, family, cfg, [tuple(s) for s in slots], device=self.device))
        self.server, port = start_server(ExpertServicer(name, experts, self.device), host)
        self.address = f"{host}:{port}"
        log.info("%s: %d expert slots on %s, data plane at %s", name, len(slots), self.device, self.address)

    def get_address(self) -> str:
        return self.address

    def check_health(self) -> None:
        # The data-plane server runs on its own threads; a replica that lost it is unhealthy.
        if self.server is None:
            raise RuntimeError("data-plane server is down")

    def __del__(self):
        if getattr(self, "server", None) is not None:
            self.server.stop(grace=1)
