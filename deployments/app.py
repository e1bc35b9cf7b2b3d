"""Build the Serve application once: model config, initial placement, policy and the data-plane
secret are computed here and bound into every deployment.

    ingress (HTTP + gRPC APIs) ──▶ routers (N, autoscaled) ──▶ expert workers (+ autoscaled pool)
                 └──────────────▶ placement controller ◀──────┘ (load reports, table versions)

Used by `moe-cluster serve` and by plain Serve configs:
    serve run deployments/serve_local.yaml
"""
from __future__ import annotations

import uuid
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from cluster.config import ModelConfig
from cluster.engine.memory import full_length_refusal
from cluster.loader import open_model
from cluster.placement import round_robin
from cluster.precision import resolve_dtype, resolve_kv_dtype
from deployments.config import AppConfig, app_config
from deployments.controller import PlacementController
from deployments.experts.auth import resolve_secret
from deployments.experts.host import WorkerSpec
from deployments.experts.worker import ExpertPoolWorker, ExpertWorker
from deployments.ingress import Ingress
from deployments.messages import AppSpec
from deployments.policy import check_copies
from deployments.prefix_router import PrefixAffinityRouter
from deployments.router import Router
from deployments.tier_config import initial_placement, profile_loads, tier_group_of, tier_layout

# Behind HAProxy a stopping ingress replica first stays reachable for Serve's deregistration window, sized
# for an external load balancer (e.g. an ALB: 30 s by default), then refuses connections and finishes what
# it has. The one balancer in front of ours is Serve's own HAProxy, which takes a stopping replica out as
# the controller announces it (updates coalesced over 0.1 s) and retries a refused connection on another.
# Serve also waits out the 30 s when the whole service stops, HAProxy already gone: `serve.shutdown()`
# gives the controller 30 s, so every Ctrl-C ended in "Controller failed to shut down within 30.0s".
INGRESS_DEREGISTRATION_S = 2.0
# A stopping replica sleeps this long before each look at its ongoing requests, the first look
# included: Serve's default, 2 s, made every stop (Ctrl-C, a scale-in, a redeploy) wait 2 s a
# deployment in turn, idle or not. Serve logs a line per look while requests remain, so not less.
# (The pool keeps the default: its replicas hand their copies back for up to minutes.)
SHUTDOWN_POLL_S = 0.5


def spec_of(cfg: AppConfig) -> AppSpec:
    _, _, model_cfg = open_model(cfg.model)  # fail fast, before anything is deployed
    _check_kv_budget(cfg, model_cfg)
    placement = round_robin(model_cfg.experts(), cfg.num_workers, cfg.expert_copies) if cfg.num_workers else None
    layout = None
    layers, policy = list(model_cfg.moe_layer_ids), cfg.policy()
    check_copies(policy, cfg.expert_copies)
    loads = (profile_loads(policy.profile_file, layers, model_cfg.num_experts)  # another model's: refused here
             if policy is not None and policy.mode == "static" else None)
    if cfg.tiers:  # the fast tier's room to the hottest experts (evenly, or from a static profile), the rest on host
        of_device = lambda d: model_cfg.expert_bytes(resolve_dtype(cfg.dtype, d, model_cfg.checkpoint_dtype))  # noqa
        placement = initial_placement(cfg.tiers, layers, model_cfg.num_experts, of_device, loads)
        layout = tier_layout(cfg.tiers, of_device)
    # one copy's bytes at the dtype the workers hold it in (memory budgets, metrics)
    expert_bytes = model_cfg.expert_bytes(resolve_dtype(cfg.dtype, cfg.worker_device, model_cfg.checkpoint_dtype))
    return AppSpec(uuid.uuid4().hex, cfg, placement, cfg.policy(), resolve_secret(cfg.data_plane_secret), model_cfg.moe_layer_ids,
                   model_cfg.num_experts, expert_bytes, layout)


def _check_kv_budget(cfg: AppConfig, model_cfg: ModelConfig) -> None:
    """A router's explicit KV budget must hold one full-length sequence: the ingress fills a request
    without max_tokens up to max_model_len, which a smaller cache would refuse every time."""
    if cfg.kv_cache_memory_bytes is None:  # sized by the router itself, at least one sequence (memory.py)
        return
    kv_dtype = resolve_kv_dtype(cfg.kv_cache_dtype, resolve_dtype(cfg.dtype, cfg.routers.device,
                                                                   model_cfg.checkpoint_dtype))
    reason = full_length_refusal(model_cfg, kv_dtype, cfg.kv_cache_memory_bytes, cfg.max_model_len,
                                 cfg.block_size, cfg.max_num_seqs)
    if reason:
        raise ValueError(reason)


def worker_actor_options(cfg: AppConfig, worker: int = 0) -> dict[str, Any]:
    w = tier_group_of(cfg.tiers, worker) if cfg.tiers else cfg.worker
    options: dict[str, Any] = {"num_cpus": w.num_cpus, "num_gpus": w.num_gpus}
    if w.memory:
        options["memory"] = w.memory
    selectors = getattr(w, "label_selectors", None)  # a tier group has one selector for all its workers
    selector = selectors[worker % len(selectors)] if selectors else w.label_selector
    if selector:
        options["label_selector"] = dict(selector)
    return options


def worker_spec(spec: AppSpec, name: str, experts, worker: int | None = None) -> WorkerSpec:
    """One expert worker's spec: the same for the fixed workers and the pool but for name and copies, and
    for a fixed worker of a tier group (`worker`: its index), that group's threads, device and tier."""
    cfg = spec.cfg
    threads, device, tier = _kind(cfg, worker)
    return WorkerSpec(model=cfg.model, secret=spec.data_plane_secret, experts=tuple(tuple(e) for e in experts),
                      name=name, host=cfg.data_plane_host, device=device, dtype=cfg.dtype, torch_threads=threads,
                      service_time_per_token_s=cfg.worker.service_time_per_token_s, tier=tier)


def _workers(spec: AppSpec) -> list:
    cfg = spec.cfg
    deployment = serve.deployment(ExpertWorker, health_check_period_s=5, max_ongoing_requests=16,
                                  graceful_shutdown_wait_loop_s=SHUTDOWN_POLL_S)
    return [deployment.options(name=f"expert-worker-{i}", ray_actor_options=worker_actor_options(cfg, i))
            .bind(spec=worker_spec(spec, f"expert-worker-{i}", spec.placement.workers[i], worker=i))
            for i in range(cfg.num_workers)]


def _kind(cfg: AppConfig, worker: int | None) -> tuple[int, str, str]:
    """(torch threads, device, tier) of a worker: a fixed worker's tier group's, else the worker
    section's (the pool, an untiered app: no tier)."""
    if cfg.tiers and worker is not None:
        group = tier_group_of(cfg.tiers, worker)
        return group.torch_threads, group.device, group.name
    return cfg.worker.torch_threads, cfg.worker_device, ""


def _pool(spec: AppSpec, controller):
    """The autoscaled expert pool, when the config asks for one (pool.max_workers > 0)."""
    cfg, pool = spec.cfg, spec.cfg.pool
    if not cfg.num_workers or pool.max_workers == 0:
        return None
    autoscaling = {"min_replicas": pool.min_workers, "max_replicas": pool.max_workers,
                   "initial_replicas": pool.min_workers, "metrics_interval_s": 1.0, "look_back_period_s": 5.0,
                   "upscale_delay_s": pool.upscale_delay_s, "downscale_delay_s": pool.downscale_delay_s,
                   "policy": {"policy_function": "deployments.pool_policy:scale_on_busy"}}
    # A leaving pool worker hands its copies back first (load elsewhere, every router switches):
    # Serve must wait for that before it stops the replica.
    switch = spec.policy.switch_timeout_s if spec.policy else 30.0
    deployment = serve.deployment(ExpertPoolWorker, name="expert-pool", health_check_period_s=5,
                                  max_ongoing_requests=16, graceful_shutdown_timeout_s=switch + 120)
    return (deployment.options(ray_actor_options=worker_actor_options(cfg), autoscaling_config=autoscaling)
            .bind(spec=worker_spec(spec, "expert-pool", ()), controller=controller, build_id=spec.build_id,
                  target_busy=pool.target_busy))


def _router_options(cfg: AppConfig) -> dict[str, Any]:
    r = cfg.routers
    actor = {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus}
    if r.label_selector:
        actor["label_selector"] = dict(r.label_selector)
    # Above the router's own limit (max_num_seqs + max_queued_requests → 503 at once): Serve would
    # queue requests past its limit at the caller instead, which looks like a hang to the client.
    limit = 2 * (cfg.max_num_seqs + cfg.max_queued_requests) + 8
    options: dict[str, Any] = {"ray_actor_options": actor, "health_check_period_s": 5, "max_ongoing_requests": limit,
                               "graceful_shutdown_wait_loop_s": SHUTDOWN_POLL_S}
    if r.prefix_aware:  # chosen in the ingress's handle, from the prompt's token ids (deployments/prefix_router.py)
        options["request_router_config"] = RequestRouterConfig(
            request_router_class=PrefixAffinityRouter,
            request_router_kwargs={"block_size": cfg.block_size, "max_imbalance": r.prefix_max_imbalance})
    if r.min == r.max:
        options["num_replicas"] = r.min
    else:
        options["autoscaling_config"] = {"min_replicas": r.min, "max_replicas": r.max,
                                         "target_ongoing_requests": r.target_ongoing_requests}
    return options


def build_app(cfg: AppConfig) -> Application:
    spec = spec_of(cfg)
    workers = _workers(spec) if spec.placement is not None else []
    # Everything in the controller is async: many routers' reports must never queue behind a slow
    # call (a pool worker's hand-back waits for every router to switch).
    # No access log: every router and ingress replica reports to it twice a second, and a line per
    # report buried the console (3 lines a second on an idle demo); its own events are still logged.
    # (A deployment's own logging_config also keeps the application's from reaching it.)
    controller = serve.deployment(PlacementController, name="controller", num_replicas=1, max_ongoing_requests=1000,
                                  ray_actor_options={"num_cpus": 0}, graceful_shutdown_wait_loop_s=SHUTDOWN_POLL_S,
                                  logging_config={"enable_access_log": False}).bind(spec, workers)
    pool = _pool(spec, controller)
    routers = serve.deployment(Router, name="router", **_router_options(cfg)).bind(spec, controller)
    # The ingress's code never blocks its event loop, so Serve may run it on the replica's own loop:
    # each streamed chunk then goes straight to the socket instead of hopping between two threads.
    ingress_env = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
                   "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": str(INGRESS_DEREGISTRATION_S)}
    ingress = serve.deployment(serve.ingress()(Ingress), name="ingress", num_replicas=cfg.ingress.replicas,
                               max_ongoing_requests=100_000, health_check_period_s=5,
                               graceful_shutdown_wait_loop_s=SHUTDOWN_POLL_S,
                               ray_actor_options={"num_cpus": cfg.ingress.num_cpus,
                                                  "runtime_env": {"env_vars": ingress_env}})
    return ingress.bind(spec, routers, controller, *([pool] if pool is not None else []))


def app_builder(args: dict[str, Any]) -> Application:
    """Entry point for Serve configs (`import_path: deployments.app:app_builder`)."""
    return build_app(app_config(args))
