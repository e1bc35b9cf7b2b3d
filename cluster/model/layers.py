"""Norms (Hugging Face conventions: the statistics are always taken in fp32) and the gated MLP.

Shapes: N rows, D hidden, I intermediate."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cluster.model.weights import MLPWeights


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """weight None: normalise only (Llama 4's L2 norm of q and k)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is None:
        return xf.to(x.dtype)
    if weight.dtype == torch.float32 and x.dtype != torch.float32:
        return (weight * xf).to(x.dtype)  # fp32 norm weights (gpt-oss): scale, then cast
    return weight * xf.to(x.dtype)


def norm(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float, kind: str) -> Tensor:
    """RMSNorm, or LayerNorm with a bias (phimoe)."""
    if kind == "layer":
        return F.layer_norm(x.float(), x.shape[-1:], weight.float(), None if bias is None else bias.float(),
                            eps).to(x.dtype)
    return rms_norm(x, weight, eps)


def swiglu(x: Tensor, w: MLPWeights) -> Tensor:
    """The gated MLP of every expert kind: a pure function of (weights, rows)."""
    gate_up = F.linear(x, w.gate_up, w.gate_up_bias)  # [N, 2I] ([N, I] non-gated)
    return F.linear(w.activation.apply(gate_up), w.down, w.down_bias)  # [N, D]
