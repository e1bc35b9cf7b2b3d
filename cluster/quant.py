"""Quantised checkpoints, dequantised to the serving dtype at load.

- fp8 (DeepSeek-V3, Kimi-K2, MiniMax-M2, ...): `quantization_config.quant_method: fp8`,
  weights stored F8_E4M3 with a sibling `<name>_scale_inv` F32 tensor holding
  one multiplier per `weight_block_size` block (the last block of a dimension
  may be partial): w = fp8 * scale_inv, block by block.
- mxfp4 (gpt-oss as released): `<name>_blocks` U8 [..., out, G, 16] packs two
  E2M1 values per byte (low nibble first) and `<name>_scales` U8 [..., out, G]
  a power-of-two exponent (biased by 127) per 32 values. Dequantised, a tensor
  comes out in the layout the unquantised checkpoint stores ([in, out] per expert,
  as transformers' own dequantiser returns it).

The `_scale_inv` / `_blocks` / `_scales` suffixes are these formats' conventions,
not any family's tensor names. Each tensor is moved to its device as stored and
dequantised there, one tensor at a time.
Shapes: M rows, N columns, G groups of 32 columns.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from cluster.checkpoint import Checkpoint, CheckpointError
from cluster.errors import UnsupportedModelError

_FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_MXFP4_GROUP = 32
_E4M3 = ("e4m3", "float8_e4m3fn")  # DeepSeek's spelling, MiniMax's (torch's dtype name)


@dataclass(frozen=True)
class Quantization:
    method: str = "none"  # "none" | "fp8" | "mxfp4"
    block: tuple[int, int] = (128, 128)  # fp8 weight_block_size


NONE = Quantization()


def parse_quantization(config: dict[str, Any]) -> Quantization:
    q = config.get("quantization_config")
    if not q:
        return NONE
    method = q.get("quant_method")
    if method == "fp8":
        block = q.get("weight_block_size")
        if not (isinstance(block, list) and len(block) == 2):
            raise UnsupportedModelError(
                f"config.json: quantization_config.weight_block_size {block!r} is not supported "
                "(per-tensor fp8 is not implemented; block-quantised [rows, cols] is)")
        if q.get("fmt", "e4m3") not in _E4M3:
            raise UnsupportedModelError(f"config.json: quantization_config.fmt {q['fmt']!r} is not supported "
                                        "(e4m3 / float8_e4m3fn)")
        return Quantization("fp8", (int(block[0]), int(block[1])))
    if method == "mxfp4":
        return Quantization("mxfp4")
    raise UnsupportedModelError(
        f"config.json: quantization_config.quant_method {method!r} is not supported (fp8 with weight_block_size, "
        "mxfp4; or an unquantised checkpoint)")


def dequantize_fp8(weight: Tensor, scale_inv: Tensor, block: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """weight [M, N] fp8, scale_inv [ceil(M/bm), ceil(N/bn)] → [M, N] in `dtype`."""
    m, n = weight.shape
    bm, bn = block
    if tuple(scale_inv.shape) != (math.ceil(m / bm), math.ceil(n / bn)):
        raise CheckpointError(f"fp8 scale_inv of shape {list(scale_inv.shape)} does not cover a [{m}, {n}] weight "
                              f"in {bm}x{bn} blocks")
    scale = scale_inv.float().repeat_interleave(bm, 0)[:m].repeat_interleave(bn, 1)[:, :n]  # [M, N]
    return (weight.float() * scale).to(dtype)


def dequantize_mxfp4(blocks: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """blocks [M, G, 16] u8, scales [M, G] u8 → [N, M] (N = 32 G) in `dtype` (transposed, see above)."""
    lut = torch.tensor(_FP4_VALUES, dtype=torch.float32, device=blocks.device)
    values = torch.stack([lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]], dim=-1)  # [M, G, 16, 2]
    values = values.reshape(*blocks.shape[:-1], -1)  # [M, G, 32]
    out = torch.ldexp(values, scales.to(torch.int32)[..., None] - 127).reshape(blocks.shape[0], -1)  # [M, N]
    return out.t().contiguous().to(dtype)


def read_weight(ckpt: Checkpoint, quant: Quantization, name: str, shape: tuple[int, ...], dtype: torch.dtype,
                device: str, index: int | None = None) -> Tensor:
    """One weight in `dtype` on `device`, dequantised if the checkpoint stores it quantised."""
    if quant.method == "fp8" and ckpt.has(name + "_scale_inv"):
        ckpt.check_shape(name, shape, index)
        weight = ckpt.read_raw(name, index).to(device)
        scale = ckpt.read_raw(name + "_scale_inv", index).to(device)
        return dequantize_fp8(weight, scale, quant.block, dtype)
    if quant.method == "mxfp4" and ckpt.has(name + "_blocks"):
        out, n_in = shape[-1], shape[-2]
        ckpt.check_shape(name + "_blocks", (out, n_in // _MXFP4_GROUP, _MXFP4_GROUP // 2), index)
        blocks = ckpt.read_raw(name + "_blocks", index).to(device)
        scales = ckpt.read_raw(name + "_scales", index).to(device)
        return dequantize_mxfp4(blocks, scales, dtype)
    return ckpt.read(name, shape, dtype, device, index)
