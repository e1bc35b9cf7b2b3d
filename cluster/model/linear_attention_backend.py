"""Which kernels run the gated delta rule (Qwen3-Next, Qwen3.5/3.6 linear attention): torch or fla.

`linear_attention_backend` (engine and YAML): auto | torch | fla. torch runs anywhere: transformers'
torch fallbacks' algorithms (deltanet.py). fla is flash-linear-attention's Triton kernels (deltanet_fla.py),
an optional install (`pip install flash-linear-attention`) that needs a CUDA device; auto takes it on a CUDA
device when it imports. Mamba layers (Nemotron-H, Granite 4.0-H, Jamba) and models without linear layers
always run in torch: fla asked for one of them is refused, auto gives torch.
"""
from __future__ import annotations

import importlib

from cluster.config import ModelConfig
from cluster.model.attention_backend import kernel_or_fallback
from cluster.model.deltanet import TORCH_RULE, DeltaRule

BACKENDS = ("auto", "torch", "fla")
INSTALL_HINT = "pip install flash-linear-attention (with einops; Triton comes with CUDA torch)"


def fla_missing() -> str | None:
    """Why fla's gated delta rule cannot be imported here, or None when it can. Any error counts: Triton
    can fail at import (no GPU driver, a Triton release fla's autotune keys do not suit), not only with
    ImportError."""
    try:
        importlib.import_module("fla.ops.gated_delta_rule")
    except Exception as e:  # noqa: BLE001  (whatever fails, the kernels are absent)
        return f"{type(e).__name__}: {e}"
    return None


def choose_linear_backend(requested: str, device: str, linear_kind: str | None, missing: str | None) -> str:
    """The backend an engine runs its delta rule with: `requested` (auto | torch | fla) on `device` for a
    model whose linear layers are `linear_kind` ("deltanet", "mamba2", "mamba"; None: none), fla's import
    failing with `missing` (None: importable)."""
    if requested not in BACKENDS:
        raise ValueError(f"linear_attention_backend {requested!r} is not one of {', '.join(BACKENDS)}")
    if requested == "torch":
        return "torch"
    why_not = None
    if linear_kind != "deltanet":
        why_not = f"it runs gated DeltaNet layers and this model has {linear_kind or 'no linear'} layers"
    elif not device.startswith("cuda"):
        why_not = f"its Triton kernels need a CUDA device (device is {device!r})"
    elif missing is not None:
        why_not = f"flash-linear-attention does not import ({missing}); {INSTALL_HINT}"
    return kernel_or_fallback("linear_attention_backend", requested, "fla", "torch", why_not)


def linear_backend_for(requested: str, device: str, cfg: ModelConfig) -> str:
    """choose_linear_backend for a model's config; fla is imported (seconds: Triton's autotuners) only where
    it could be chosen."""
    kind = cfg.linear_kind if cfg.hybrid else None
    could = requested != "torch" and kind == "deltanet" and device.startswith("cuda")
    return choose_linear_backend(requested, device, kind, fla_missing() if could else None)


def delta_rule(name: str) -> DeltaRule:
    """The DeltaRule the model's gated DeltaNet layers call for a chosen backend."""
    if name == "torch":
        return TORCH_RULE
    from cluster.model.deltanet_fla import fla_rule
    return fla_rule()
