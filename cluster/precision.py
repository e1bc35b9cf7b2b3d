"""Which dtype weights, compute and the KV cache use.

`auto` means float32 on a CPU (bf16 matmuls on the CPUs we run on are about
100x slower than fp32) and on a GPU the checkpoint's own dtype, except that a
float32 checkpoint (or a config without a dtype) runs in bfloat16, as vLLM's
auto does: half the memory, and the grouped experts and CUDA graphs that need
bf16 (cluster/model/grouped.py). float32 on a GPU only when asked. Weights are
converted once per tensor on the device that will hold them.
"""
from __future__ import annotations

from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SETTINGS = ("auto", *DTYPES)


def checkpoint_dtype(config: dict[str, Any]) -> torch.dtype:
    """The dtype config.json says the weights were saved in (FP8 checkpoints name their unquantised
    dtype here). transformers writes `torch_dtype` (4.x) or `dtype` (5.x); absent means float32."""
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    if name not in DTYPES:
        raise ValueError(f"config.json: torch_dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_dtype(setting: str | torch.dtype | None, device: str, ckpt_dtype: torch.dtype) -> torch.dtype:
    """`dtype` setting (auto | bfloat16 | float16 | float32) → the dtype of weights and compute."""
    if isinstance(setting, torch.dtype):
        if setting not in DTYPES.values():
            raise ValueError(f"dtype: {setting} is not one of {', '.join(SETTINGS)}")
        return setting
    setting = setting or "auto"
    if setting == "auto":
        if not str(device).startswith("cuda"):
            return torch.float32
        return torch.bfloat16 if ckpt_dtype == torch.float32 else ckpt_dtype
    if setting not in DTYPES:
        raise ValueError(f"dtype: {setting!r} is not one of {', '.join(SETTINGS)}")
    return DTYPES[setting]


def resolve_kv_dtype(setting: str | torch.dtype | None, dtype: torch.dtype) -> torch.dtype:
    """`kv_cache_dtype` setting: auto = the compute dtype. (An FP8 cache is not implemented.)"""
    if isinstance(setting, torch.dtype):
        return resolve_dtype(setting, "cpu", dtype)
    if setting in (None, "auto"):
        return dtype
    if setting not in DTYPES:
        raise ValueError(f"kv_cache_dtype: {setting!r} is not one of {', '.join(SETTINGS)} "
                         "(an fp8 KV cache is not implemented)")
    return DTYPES[setting]


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)
