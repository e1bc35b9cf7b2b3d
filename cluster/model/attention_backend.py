"""Which kernels attend: SDPA over the gathered context, or FlashInfer's paged kernels on a GPU.

`attention_backend` (engine and YAML): auto | sdpa | flashinfer. SDPA runs anywhere: each decode group
and prefill chunk gathers its context from the paged cache, then attends. FlashInfer reads the pages in
place (decode and prefill, GQA native, sliding windows) and is an optional extra (`pip install
'moe-cluster[gpu]'`); auto takes it on a CUDA device when it is importable. Layers or steps it does not
cover run on SDPA: sinks (gpt-oss), chunked attention (Llama 4), sparse selection (DSA), fp32, a cache in
another dtype than the queries, head dims its kernels are not built for, and decode inside a CUDA-graph
capture (its plan runs on the host; the graph replays SDPA decode). Multi-head latent attention has its
own path (mla.py) and always uses SDPA.
"""
from __future__ import annotations

import importlib

import torch

BACKENDS = ("auto", "sdpa", "flashinfer")
FLASHINFER_HEAD_DIMS = (64, 128, 256)  # what its prebuilt and JIT kernels are instantiated for
INSTALL_HINT = "pip install 'moe-cluster[gpu]' (the `gpu` extra: flashinfer-python)"


def flashinfer_missing() -> str | None:
    """Why FlashInfer cannot be imported here, or None when it can."""
    try:
        importlib.import_module("flashinfer")
    except ImportError as e:  # also a module set to None in sys.modules
        return f"{type(e).__name__}: {e}"
    return None


def choose_backend(requested: str, device: str, attention: str, missing: str | None) -> str:
    """The backend an engine uses: `requested` (auto | sdpa | flashinfer) on `device` for a model whose
    attention is `attention` ("mha" or "mla"), FlashInfer's import failing with `missing` (None: importable)."""
    if requested not in BACKENDS:
        raise ValueError(f"attention_backend {requested!r} is not one of {', '.join(BACKENDS)}")
    if requested == "sdpa":
        return "sdpa"
    why_not = None
    if not device.startswith("cuda"):
        why_not = f"its kernels need a CUDA device (device is {device!r})"
    elif attention == "mla":
        why_not = "multi-head latent attention has its own path (absorbed decode over the latent cache)"
    elif missing is not None:
        why_not = f"FlashInfer is not installed ({missing}); {INSTALL_HINT}"
    return kernel_or_fallback("attention_backend", requested, "flashinfer", "sdpa", why_not)


def kernel_or_fallback(field: str, requested: str, kernel: str, fallback: str, why_not: str | None) -> str:
    """`kernel` when nothing stops it (why_not None); otherwise refused with the reason if it was asked for by
    name, else `fallback` (auto). Shared by the engine's kernel choices (this file, linear_attention_backend)."""
    if why_not is None:
        return kernel
    if requested == kernel:
        raise ValueError(f"{field} {kernel}: {why_not}")
    return fallback


def flashinfer_declines(q_dtype: torch.dtype, kv_dtype: torch.dtype, head_dim: int, sinks: bool,
                        chunk: int | None, select: bool) -> str | None:
    """Why FlashInfer does not attend this layer (SDPA does), or None when it does."""
    if sinks:
        return "attention sinks"
    if chunk is not None:
        return "chunked attention"
    if select:
        return "sparse attention's selection"
    if q_dtype not in (torch.float16, torch.bfloat16):
        return f"{q_dtype} queries (its kernels take fp16/bf16)"
    if kv_dtype != q_dtype:
        return f"a {kv_dtype} cache under {q_dtype} queries"
    if head_dim not in FLASHINFER_HEAD_DIMS:
        return f"head_dim {head_dim} (built for {FLASHINFER_HEAD_DIMS})"
    return None


def make_backend(name: str, device: str):
    """The paged-attention object the model's attention calls (None: SDPA only)."""
    if name == "sdpa":
        return None
    from cluster.model.flashinfer_attention import FlashInferAttention
    return FlashInferAttention(torch.device(device))
