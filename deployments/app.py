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
from deployments.expert_worker import ExpertPoolWorker, ExpertWorker
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
    return router.bind(cfg.model_dump(), workers, _pool(cfg))


def _pool(cfg: AppConfig):
    """The autoscaled expert pool, when the policy asks for one (max_pool_workers > 0)."""
    policy = cfg.policy()
    if not cfg.num_workers or policy is None or policy.max_pool_workers == 0:
        return None
    autoscaling = {"min_replicas": policy.min_pool_workers, "max_replicas": policy.max_pool_workers,
                   "initial_replicas": policy.min_pool_workers, "metrics_interval_s": 1.0,
                   "look_back_period_s": 5.0, "upscale_delay_s": policy.pool_upscale_delay_s,
                   "downscale_delay_s": policy.pool_downscale_delay_s,
                   "policy": {"policy_function": "deployments.pool_policy:scale_on_busy"}}
    return (ExpertPoolWorker.options(name="expert-pool", ray_actor_options=worker_actor_options(cfg),
                                     autoscaling_config=autoscaling)
            .bind(cfg.model, cfg.app_name, cfg.data_plane_host, cfg.worker.torch_threads,
                  "cuda" if cfg.worker.num_gpus > 0 else "cpu", cfg.worker.service_time_per_token_s,
                  policy.pool_target_busy))


def app_builder(args: dict[str, Any]) -> Application:
    """Entry point for Serve configs (`import_path: deployments.app:app_builder`)."""
    return build_app(app_config(args))
