"""Build the Serve application: N expert workers (placement from cluster.placement) + the router.

Used by `moe-cluster serve` and by plain Serve configs:
    serve run deployments/serve_local.yaml
"""
from __future__ import annotations

from typing import Any

from ray.serve import Application

from cluster.loader import open_model
from cluster.placement import round_robin
from deployments.config import AppConfig, app_config
from deployments.expert_worker import ExpertWorker
from deployments.router import Router


def worker_actor_options(cfg: AppConfig, worker: int = 0) -> dict[str, Any]:
    w = cfg.worker
    options: dict[str, Any] = {"num_cpus": w.num_cpus, "num_gpus": w.num_gpus}
    if w.memory:
        options["memory"] = w.memory
    selector = w.label_selectors[worker % len(w.label_selectors)] if w.label_selectors else w.label_selector
    if selector:
        options["label_selector"] = dict(selector)
    return options


def build_app(cfg: AppConfig) -> Application:
    _, _, model_cfg = open_model(cfg.model)  # fail fast, before anything is deployed
    placement = round_robin(model_cfg.expert_pairs(), cfg.num_workers, cfg.expert_copies) if cfg.num_workers else None
    workers = []
    for i in range(cfg.num_workers):
        name = f"expert-worker-{i}"
        slots = [list(s) for s in placement.workers[i]]
        workers.append(ExpertWorker.options(name=name, ray_actor_options=worker_actor_options(cfg, i))
                       .bind(cfg.model, slots, name, cfg.data_plane_host, cfg.worker.torch_threads,
                             "cuda" if cfg.worker.num_gpus > 0 else "cpu", cfg.worker.service_time_per_token_s))
    router = Router.options(ray_actor_options={"num_cpus": cfg.router_num_cpus, "num_gpus": cfg.router_num_gpus})
    return router.bind(cfg.model_dump(), workers)


def app_builder(args: dict[str, Any]) -> Application:
    """Entry point for Serve configs (`import_path: deployments.app:app_builder`)."""
    return build_app(app_config(args))
