"""The serving application's settings (the `args` of the Serve application), validated by pydantic."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from deployments.policy import AutoscalePolicy, load_policy


class WorkerOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

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


class AppConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field("models/demo", description="checkpoint directory (config.json + safetensors)")
    app_name: str = Field("moe", description="the Serve application's name (expert-pool replicas find the router "
                                             "by it); keep it equal to the name in the Serve config")
    served_model_name: str | None = Field(None, description="name clients pass as `model` (default: the directory name)")
    num_workers: int = Field(2, ge=0, description="expert workers; 0 keeps the experts in the router process")
    expert_copies: int = Field(1, ge=1, description="copies of every expert at start (on different workers); "
                                                  "2 lets a worker die without failing a request")
    expert_call_timeout_s: float = Field(10.0, gt=0, description="deadline of one expert call; a call past it is "
                                                                 "re-sent to another copy and the worker marked down")
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM: how long in-flight requests may run on "
                                                           "while new ones get 503")
    data_plane_host: str = Field("127.0.0.1", description="address the expert workers' gRPC data plane binds to")
    router_device: str = Field("cpu", description="device of the router's backbone: cpu or cuda")
    router_num_cpus: float = Field(1.0, ge=0, description="Ray CPUs reserved for the router replica")
    router_num_gpus: float = Field(0.0, ge=0, description="GPUs for the router replica")
    max_num_seqs: int = Field(64, ge=1, description="sequences decoded together (KV-cache slots)")
    max_model_len: int = Field(1024, ge=8, description="context length: prompt + max_tokens")
    max_num_batched_tokens: int = Field(4096, ge=1, description="prompt tokens admitted per step")
    worker: WorkerOptions = Field(default_factory=WorkerOptions)
    autoscaler: AutoscalePolicy | None = Field(None, description="hot-expert autoscaling policy (inline); "
                                                                 "off when neither this nor policy_file is set")
    policy_file: str | None = Field(None, description="hot-expert autoscaling policy YAML (deployments/policies/)")
    api_key: str | None = Field(None, description="require this key (HTTP `Authorization: Bearer`, gRPC metadata) "
                                                  "on every route but /health; prefer the MOE_CLUSTER_API_KEY "
                                                  "environment variable, which is used when this is unset")
    max_queued_requests: int = Field(256, ge=0, description="requests that may wait for a KV-cache slot; "
                                                            "beyond that new ones get 503 / RESOURCE_EXHAUSTED")
    request_timeout_s: float = Field(300.0, gt=0, description="a request still running after this gets 408 / "
                                                              "DEADLINE_EXCEEDED and its work is released")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="HTTP request bodies larger than this get 413")

    @model_validator(mode="after")
    def _copies_fit(self) -> "AppConfig":
        if self.num_workers and self.expert_copies > self.num_workers:
            raise ValueError(f"expert_copies ({self.expert_copies}) must not exceed num_workers ({self.num_workers})")
        return self

    def resolved_api_key(self) -> str | None:
        return self.api_key or os.environ.get("MOE_CLUSTER_API_KEY") or None

    def policy(self) -> AutoscalePolicy | None:
        return load_policy(self.policy_file) if self.policy_file else self.autoscaler

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).name


def describe(e: ValidationError) -> str:
    """One line per bad field: 'worker.num_cpus: Input should be greater than or equal to 0'."""
    return "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())


def load_serve_config(path: str) -> dict[str, Any]:
    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict) or not data.get("applications"):
        raise ValueError(f"{path}: not a Ray Serve config (needs an 'applications' list)")
    return data


def app_config(args: dict[str, Any]) -> AppConfig:
    try:
        return AppConfig(**args)
    except ValidationError as e:
        raise ValueError(f"bad application config: {describe(e)}") from None
