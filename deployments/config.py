"""The serving application's deployment options (the `args` of the Serve application), validated
by pydantic. Read once, when the application is built; the runtime autoscaling policy (what
`PUT /admin/policy` changes) lives apart, in deployments/policy.py."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from deployments.api.tool_parsers import PARSERS

from deployments.policy import AutoscalePolicy, describe, load_policy
from deployments.tier_config import TierGroup, check_tiers


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class WorkerOptions(_Options):
    num_cpus: float = Field(1.0, ge=0, description="Ray CPUs reserved per expert worker replica")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per expert worker; > 0 puts its experts on cuda")
    memory: int | None = Field(None, ge=0, description="bytes of memory reserved per expert worker (Ray resource)")
    label_selector: dict[str, str] = Field(default_factory=dict,
                                           description="node labels an expert worker must land on")
    label_selectors: list[dict[str, str]] = Field(default_factory=list,
                                                  description="per-worker node labels: worker i uses entry "
                                                              "i mod len (overrides label_selector); e.g. one "
                                                              "worker per node, or some next to the router")
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads per expert worker")
    service_time_per_token_s: float = Field(0.0, ge=0, description="benchmarks only: make each worker behave like "
                                            "a device of fixed capacity (calls one at a time, at least this many "
                                            "seconds per row); 0 = off")


class RouterOptions(_Options):
    min: int = Field(1, ge=1, description="router replicas Serve keeps at least (each has its own batching "
                                          "engine and KV cache; all share the expert workers)")
    max: int = Field(1, ge=1, description="router replicas Serve may scale up to on ongoing requests")
    target_ongoing_requests: float = Field(32, gt=0, description="Serve adds a router when the mean ongoing "
                                                                 "requests per router exceed this")
    num_cpus: float = Field(1.0, ge=0, description="Ray CPUs reserved per router replica")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads per router (default: what "
                                                              "Ray sets from num_cpus)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per router replica")
    device: str | None = Field(None, description="device of the router's backbone: cpu or cuda; default cuda "
                                                 "when num_gpus > 0, else cpu (as workers derive theirs)")
    label_selector: dict[str, str] = Field(default_factory=dict, description="node labels a router must land on")
    prefix_aware: bool = Field(True, description="send each request to the router most likely to hold its prompt's "
                               "prefix in its KV cache (the router that took the conversation's earlier turn), load "
                               "as the tie-breaker; off: Serve's power of two choices")
    prefix_max_imbalance: int = Field(16, ge=0, description="prefix-aware routing gives up affinity when that router "
                                      "has more than this many requests above the least loaded one")

    @model_validator(mode="after")
    def _bounds(self) -> "RouterOptions":
        if self.min > self.max:
            raise ValueError(f"routers.min ({self.min}) must not exceed routers.max ({self.max})")
        self.device = router_device(self.device, self.num_gpus)
        return self


def router_device(device: str | None, num_gpus: float) -> str:
    """The router's device from its setting and its GPUs: Ray hides every GPU from a replica with
    num_gpus 0, so cuda there fails at load (and Serve restarts it forever)."""
    if device is None:
        return "cuda" if num_gpus > 0 else "cpu"
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"routers.device {device!r} is not cpu or cuda")
    if device.startswith("cuda") and num_gpus <= 0:
        raise ValueError(f"routers.device {device!r} needs routers.num_gpus > 0 (Ray shows a replica "
                         "without GPUs none)")
    return device


class IngressOptions(_Options):
    replicas: int = Field(1, ge=1, description="API replicas (HTTP + gRPC, tokenisation, retries); light, CPU only")
    num_cpus: float = Field(0.25, ge=0, description="Ray CPUs reserved per API replica")


class PoolOptions(_Options):
    min_workers: int = Field(0, ge=0, description="expert-pool replicas Serve keeps at least (the pool adds "
                                                  "workers beside the fixed num_workers)")
    max_workers: int = Field(0, ge=0, description="expert-pool replicas Serve may scale up to; 0 = no pool")
    target_busy: float = Field(0.6, gt=0, le=1, description="pool workers' target busy fraction (time spent "
                                                            "computing experts); above it Serve adds workers")
    upscale_delay_s: float = Field(10.0, ge=0, description="Serve waits this long before adding a pool worker")
    downscale_delay_s: float = Field(60.0, ge=0, description="and this long before removing one")

    @model_validator(mode="after")
    def _bounds(self) -> "PoolOptions":
        if self.min_workers > self.max_workers:
            raise ValueError(f"pool.min_workers ({self.min_workers}) must not exceed pool.max_workers "
                             f"({self.max_workers})")
        return self


class AppConfig(_Options):
    model: str = Field("models/demo", description="checkpoint directory (config.json + safetensors)")
    app_name: str = Field("moe", description="the Serve application's name; keep it equal to the name in the "
                                             "Serve config")
    served_model_name: str | None = Field(None, description="name clients pass as `model` (default: the directory name)")
    routers: RouterOptions = Field(default_factory=RouterOptions)
    ingress: IngressOptions = Field(default_factory=IngressOptions)
    num_workers: int = Field(2, ge=0, description="expert workers; 0 keeps the experts in the router process")
    expert_copies: int = Field(1, ge=1, description="copies of every expert at start (on different workers); "
                                                  "2 lets a worker die without failing a request")
    expert_call_timeout_s: float = Field(10.0, gt=0, description="deadline of one expert call; a call past it is "
                                                                 "re-sent to another copy and the worker marked down")
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM: how long in-flight requests may run on "
                                                           "while new ones get 503")
    data_plane_host: str = Field("127.0.0.1", description="address the expert workers' data plane binds to")
    data_plane_secret: str | None = Field(None, description="shared secret of the expert data plane; prefer the "
                                          "MOE_CLUSTER_DATA_PLANE_SECRET environment variable; unset: one is "
                                          "generated per application")
    data_plane_transport: Literal["auto", "grpc", "shm", "cuda_ipc"] = Field(
        "auto", description="expert calls to workers on the router's node: auto = CUDA IPC when router and worker "
                            "are on GPUs, else shared memory; grpc / shm / cuda_ipc cap the choice (tests, "
                            "benchmarks). Workers on other nodes always use gRPC; cuda_ipc needs CUDA on both sides")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="weights and compute (routers and expert workers): auto = the checkpoint's dtype on a "
                            "GPU (bfloat16 for a float32 checkpoint), float32 on a CPU; expert rows cross the data "
                            "plane in it")
    kv_cache_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="the routers' KV cache (auto = dtype)")
    kv_cache_memory_bytes: int | None = Field(None, ge=1, description="bytes of KV cache per router (default: "
                                              "what max_num_seqs × max_model_len needs, capped by "
                                              "gpu_memory_utilization of the GPU or 4 GiB on a CPU)")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="fraction of a router's GPU its weights "
                                          "and KV cache may use")
    max_num_seqs: int = Field(64, ge=1, description="sequences each router decodes together")
    max_model_len: int = Field(1024, ge=8, description="context length: prompt + max_tokens")
    max_num_batched_tokens: int = Field(4096, ge=1, description="prompt tokens admitted per step")
    attention_backend: Literal["auto", "sdpa", "flashinfer"] = Field(
        "auto", description="the routers' attention kernels: flashinfer = FlashInfer's paged decode and prefill "
                            "(a GPU router with the `gpu` extra installed; refused otherwise), sdpa = PyTorch's SDPA "
                            "over the gathered context; auto = flashinfer where it can run, else sdpa")
    linear_attention_backend: Literal["auto", "torch", "fla"] = Field(
        "auto", description="the routers' gated DeltaNet kernels (Qwen3-Next, Qwen3.5/3.6): fla = "
                            "flash-linear-attention's Triton kernels (a GPU router with flash-linear-attention "
                            "installed; refused otherwise, and for models without gated DeltaNet layers), torch = "
                            "the torch chunked and recurrent forms; auto = fla where it can run, else torch")
    cuda_graph_max_seqs: int | None = Field(None, ge=1, description="a GPU router captures its decode steps' CUDA "
                                            "graphs at start-up for up to this many sequences (powers of two) and "
                                            "every context bucket up to max_model_len; larger steps run eagerly "
                                            "(default: max_num_seqs)")
    block_size: int = Field(16, ge=1, description="tokens per KV-cache block (prefix caching and prefix-aware routing "
                            "reuse whole blocks)")
    enable_prefix_caching: bool = Field(True, description="reuse the KV-cache blocks of prompts that start like "
                                        "earlier ones on the same router (automatic prefix caching)")
    overlap: Literal["auto", "on", "off"] = Field("auto", description="run each step as two micro-batches in "
                                                  "ping-pong, so expert workers compute one while the router "
                                                  "computes the other; auto = on when the experts are remote and the "
                                                  "router runs on a GPU")
    worker: WorkerOptions = Field(default_factory=WorkerOptions)
    pool: PoolOptions = Field(default_factory=PoolOptions)
    tiers: list[TierGroup] = Field(default_factory=list, description="expert tiers (deployments/tier_config.py): "
                                   "worker groups of different kinds; they replace num_workers and worker's "
                                   "resources; empty = one kind of worker")
    autoscaler: AutoscalePolicy | None = Field(None, description="hot-expert autoscaling policy (inline); "
                                                                 "off when neither this nor policy_file is set")
    policy_file: str | None = Field(None, description="hot-expert autoscaling policy YAML (deployments/policies/)")
    api_key: str | None = Field(None, description="require this key (HTTP `Authorization: Bearer`, gRPC metadata) "
                                                  "on every route but /health; prefer the MOE_CLUSTER_API_KEY "
                                                  "environment variable, which is used when this is unset")
    max_queued_requests: int = Field(256, ge=0, description="requests that may wait for a KV-cache slot on a "
                                                            "router; beyond that new ones get 503")
    request_timeout_s: float = Field(300.0, gt=0, description="a request still running after this gets 408 / "
                                                              "DEADLINE_EXCEEDED and its work is released")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="HTTP bodies and gRPC prompts larger than this get "
                                                              "413 / RESOURCE_EXHAUSTED")
    stream_interval: int = Field(1, ge=1, le=64, description="a stream's tokens travel from its router in groups "
                                 "of this many (the first at once, the last when it ends), as vLLM's and SGLang's "
                                 "--stream-interval: fewer messages per token, at the cost of burstier streams")
    tool_call_parser: str | None = Field(None, description="how tool calls are read from replies: hermes | "
                                         "qwen3_coder | deepseek_v3 | deepseek_v31 | kimi_k2 | glm45 | mistral | "
                                         "openai (vLLM's --tool-call-parser names); default: detected from the "
                                         "chat template")
    reasoning_parser: Literal["deepseek_r1", "deepseek_v3", "qwen3", "glm45", "gpt_oss", "none"] | None = Field(
        None, description="how a reasoning model's thinking is split into reasoning_content (vLLM's "
                          "--reasoning-parser names; the first four read <think> blocks alike); default: detected "
                          "from the chat template")
    engine_step_delay_s: float = Field(0.0, ge=0, le=5, description="testing only: sleep this long before every "
                                       "engine step (makes time-dependent tests independent of the machine)")

    @field_validator("tool_call_parser")
    @classmethod
    def _known_parser(cls, name: str | None) -> str | None:
        if name is not None and name not in PARSERS:
            raise ValueError(f"tool_call_parser {name!r} is not one of {sorted(PARSERS)}")
        return name

    @model_validator(mode="after")
    def _consistent(self) -> "AppConfig":
        if self.num_workers and self.expert_copies > self.num_workers:
            raise ValueError(f"expert_copies ({self.expert_copies}) must not exceed num_workers ({self.num_workers})")
        if self.pool.max_workers and not self.num_workers:
            raise ValueError("pool.max_workers > 0 needs num_workers ≥ 1 (the pool joins fixed expert workers)")
        if self.autoscaler is not None and self.policy_file:  # else the file wins and the inline policy is lost
            raise ValueError(f"give the policy inline (autoscaler) or by file (policy_file: {self.policy_file}), "
                             "not both")
        if self.tiers:
            self._tiered()
        return self

    def _tiered(self) -> None:
        """Tiers decide the workers and their copies: num_workers follows them."""
        check_tiers(self.tiers)
        count = sum(g.count for g in self.tiers)
        if "num_workers" in self.model_fields_set and self.num_workers != count:
            raise ValueError(f"num_workers ({self.num_workers}) differs from the tiers' workers ({count}): "
                             "leave num_workers out with tiers")
        if self.expert_copies != 1 or self.pool.max_workers:
            raise ValueError("tiers decide the copies: expert_copies and pool.max_workers are not used with tiers "
                             "(leave them at 1 and 0)")
        self.num_workers = count

    def engine_options(self) -> dict[str, Any]:
        """What a router's engine is built with (LLMEngine.from_pretrained keywords)."""
        return {"dtype": self.dtype, "kv_cache_dtype": self.kv_cache_dtype,
                "kv_cache_memory_bytes": self.kv_cache_memory_bytes,
                "gpu_memory_utilization": self.gpu_memory_utilization, "max_model_len": self.max_model_len,
                "max_num_seqs": self.max_num_seqs, "max_num_batched_tokens": self.max_num_batched_tokens,
                "block_size": self.block_size,
                "enable_prefix_caching": self.enable_prefix_caching, "attention_backend": self.attention_backend,
                "linear_attention_backend": self.linear_attention_backend,
                "cuda_graph_max_seqs": self.cuda_graph_max_seqs,
                "overlap": {"auto": None, "on": True, "off": False}[self.overlap]}

    def gpu_needs(self) -> dict[str, float]:
        """GPUs each role needs for Serve to start the application (routers.min, the fixed workers,
        pool.min_workers): what a one-machine start checks before Ray waits forever for them."""
        workers = ({f"tier {g.name!r}": g.count * g.num_gpus for g in self.tiers} if self.tiers else
                   {"expert workers": (self.num_workers + self.pool.min_workers) * self.worker.num_gpus})
        needs = {"routers": self.routers.min * self.routers.num_gpus, **workers}
        return {role: n for role, n in needs.items() if n > 0}

    @property
    def worker_device(self) -> str:
        return "cuda" if self.worker.num_gpus > 0 else "cpu"

    def resolved_api_key(self) -> str | None:
        return self.api_key or os.environ.get("MOE_CLUSTER_API_KEY") or None

    def policy(self) -> AutoscalePolicy | None:
        return load_policy(self.policy_file) if self.policy_file else self.autoscaler

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).name




def load_serve_config(path: str) -> dict[str, Any]:
    """The Serve config file; every way it can be malformed is one line naming the file."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    apps = data.get("applications") if isinstance(data, dict) else None
    if not isinstance(apps, list) or not apps or not isinstance(apps[0], dict):
        raise ValueError(f"{path}: not a Ray Serve config (needs an 'applications' list of mappings)")
    if apps[0].get("args", {}) is None:
        apps[0]["args"] = {}  # `args:` with nothing under it: the defaults
    if not isinstance(apps[0].get("args", {}), dict):
        raise ValueError(f"{path}: applications[0].args must be a mapping of option: value, "
                         f"not a {type(apps[0]['args']).__name__}")
    return data


def app_config(args: dict[str, Any]) -> AppConfig:
    try:
        return AppConfig(**args)
    except ValidationError as e:
        raise ValueError(f"bad application config: {describe(e)}") from None
