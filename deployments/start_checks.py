"""What `moe-cluster` refuses before it starts anything: settings it used to take silently or that
failed only after the Ray start. Each raises ValueError with one line for the user (exit 2)."""
from __future__ import annotations

import os
import socket


def check_context(max_model_len: int | None, model: str) -> None:
    """--max-model-len above the model's context was capped to it without a word (vLLM refuses it too)."""
    from cluster.sizing import model_config

    if max_model_len is not None and max_model_len > (limit := model_config(model).context_limit):
        raise ValueError(f"--max-model-len {max_model_len} is above the model's context length ({limit}, from its "
                         "config.json, rope scaling included)")


def check_key(api_key: str | None) -> None:
    """An empty key (`--api-key "$KEY"` with KEY unset, `api_key: ""` in a config) served every route to
    anyone, without a word. `api_key`: the flag's, else the config's."""
    if api_key == "" or (api_key is None and os.environ.get("MOE_CLUSTER_API_KEY") == ""):
        raise ValueError("the API key is empty (--api-key or MOE_CLUSTER_API_KEY): give the key, or leave both "
                         "unset to serve without one")


def check_ports_differ(ports: dict[str, int]) -> None:
    """HTTP and gRPC on one port: HAProxy's second frontend could not bind, a traceback after the Ray start."""
    if len(set(ports.values())) < len(ports):
        raise ValueError(f"{' and '.join(ports)} are both {next(iter(ports.values()))}: HTTP and gRPC each need "
                         "a port of their own")


def check_ports_free(host: str, ports: dict[str, int]) -> None:
    """A local start's public ports (`ports`: flag → port): one taken ended in a 65-line HAProxy traceback,
    after the Ray start."""
    for flag, port in ports.items():
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is no conflict
            try:
                s.bind((host, port))
            except OSError as e:
                raise ValueError(f"port {port} on {host} is taken ({e.strerror}): stop what listens there, or "
                                 f"pick another with {flag}") from None


def check_local_gpus(cfg) -> None:
    """A one-machine start with fewer GPUs than the config asks for would wait in Serve forever."""
    needs = cfg.gpu_needs()
    if not needs:
        return
    import torch

    have = torch.cuda.device_count()
    if sum(needs.values()) > have:
        parts = ", ".join(f"{role} {n:g}" for role, n in needs.items())
        raise ValueError(f"the config needs {sum(needs.values()):g} GPU(s) ({parts}) and this machine has {have}: "
                         "run it where the GPUs are, join a cluster that has them (--address), or set "
                         "num_gpus 0 / device cpu")
