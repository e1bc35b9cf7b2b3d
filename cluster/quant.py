"""Quantised checkpoints, dequantised to the serving dtype at load.

- fp8 (DeepSeek-V3, Kimi-K2, MiniMax-M2, ...): `quantization_config.quant_method: fp8`,
  weights stored F8_E4M3 with a sibling `<name>_scale_inv` F32 tensor holding
  one multiplier per `weight_block_size` block (the last block of a dimension
  may be partial): w = fp8 * scale_inv, block by block.
  DeepSeek-V4 names the scale `<module>.scale` (UE8M0: float8_e8m0fnu, a power of two) and stores
  its routed experts as FP4 instead (`expert_dtype: fp4`): `<module>.weight` I8 (or F4) [M, N/2], two
  E2M1 values per byte (low nibble first), with one UE8M0 `<module>.scale` per 32 values of a row
  [M, N/32]: w = e2m1 * scale.
- mxfp4 (gpt-oss as released): `<name>_blocks` U8 [..., out, G, 16] packs two
  E2M1 values per byte (low nibble first) and `<name>_scales` U8 [..., out, G]
  a power-of-two exponent (biased by 127) per 32 values. Dequantised, a tensor
  comes out in the layout the unquantised checkpoint stores ([in, out] per expert,
  as transformers' own dequantiser returns it).
- int4 (compressed-tensors `pack-quantized`, Kimi-K2-Thinking / K2.5): `<module>.weight_packed`
  I32 [M, N/8] holds eight 4-bit values per word, low bits first, each stored as q + 8;
  `<module>.weight_scale` [M, N/group] one scale per group of columns; `<module>.weight_shape`
  [M, N]. Symmetric (no zero point): w = q * scale. The layout is compressed-tensors'
  (pack_to_int32 / unpack_from_int32), which the tests use as the reference.

The `_scale_inv` / `_blocks` / `_scales` / `_packed` suffixes are these formats' conventions,
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
    method: str = "none"  # "none" | "fp8" | "mxfp4" | "int4"
    block: tuple[int, int] = (128, 128)  # fp8 weight_block_size
    group: int = 32  # int4: columns per scale


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
        expert_dtype = q.get("expert_dtype", config.get("expert_dtype", "fp8"))
        if expert_dtype not in ("fp8", "fp4"):
            raise UnsupportedModelError(f"config.json: expert_dtype {expert_dtype!r} is not supported (fp8 or fp4)")
        return Quantization("fp8", (int(block[0]), int(block[1])))
    if method == "mxfp4":
        return Quantization("mxfp4")
    if method == "compressed-tensors":
        return _compressed_tensors(q)
    raise UnsupportedModelError(
        f"config.json: quantization_config.quant_method {method!r} is not supported (fp8 with weight_block_size, "
        "mxfp4, compressed-tensors pack-quantized int4; or an unquantised checkpoint)")


# The one compressed-tensors scheme we dequantise: weight-only, symmetric, static, int4 in groups.
_INT4_WEIGHTS = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "dynamic": False}


def _compressed_tensors(q: dict[str, Any]) -> Quantization:
    def refuse(field: str, value: Any, why: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"config.json: quantization_config.{field} {value!r} is not supported ({why})")

    if q.get("format") != "pack-quantized":
        raise refuse("format", q.get("format"), "compressed-tensors is read in its 'pack-quantized' format only")
    groups = q.get("config_groups") or {}
    if not groups:
        raise refuse("config_groups", groups, "one group of int4 weights is needed")
    sizes = set()
    for name, group in groups.items():
        if group.get("input_activations") or group.get("output_activations"):
            raise refuse(f"config_groups.{name}.input_activations", group.get("input_activations"),
                         "weight-only int4; quantised activations are not implemented")
        weights = group.get("weights") or {}
        for key, want in _INT4_WEIGHTS.items():
            if weights.get(key, want) != want:
                raise refuse(f"config_groups.{name}.weights.{key}", weights.get(key), f"only {want!r}")
        sizes.add(int(weights.get("group_size") or 0))
    if len(sizes) != 1 or min(sizes) <= 0:
        raise refuse("config_groups.*.weights.group_size", sorted(sizes), "one positive group size for all groups")
    return Quantization("int4", group=sizes.pop())


def dequantize_fp8(weight: Tensor, scale_inv: Tensor, block: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """weight [M, N] fp8, scale_inv [ceil(M/bm), ceil(N/bn)] → [M, N] in `dtype`."""
    m, n = weight.shape
    bm, bn = block
    if tuple(scale_inv.shape) != (math.ceil(m / bm), math.ceil(n / bn)):
        raise CheckpointError(f"fp8 scale_inv of shape {list(scale_inv.shape)} does not cover a [{m}, {n}] weight "
                              f"in {bm}x{bn} blocks")
    scale = scale_inv.float().repeat_interleave(bm, 0)[:m].repeat_interleave(bn, 1)[:, :n]  # [M, N]
    return (weight.float() * scale).to(dtype)


def dequantize_fp4(packed: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """packed [M, N/2] (two E2M1 per byte, low nibble first), scale [M, N/32] → [M, N] in `dtype`."""
    lut = torch.tensor(_FP4_VALUES, dtype=torch.float32, device=packed.device)
    u8 = packed.contiguous().view(torch.uint8)
    values = torch.stack([lut[(u8 & 0x0F).long()], lut[(u8 >> 4).long()]], dim=-1).reshape(u8.shape[0], -1)  # [M, N]
    group = values.shape[-1] // scale.shape[-1]
    return (values * scale.float().repeat_interleave(group, dim=-1)).to(dtype)


def _scale_name(ckpt: Checkpoint, name: str) -> str | None:
    """The fp8 / fp4 scale stored beside weight `name`: `<name>_scale_inv`, or DeepSeek-V4's `<module>.scale`."""
    for candidate in (name + "_scale_inv", name[:-len("weight")] + "scale" if name.endswith(".weight") else None):
        if candidate and ckpt.has(candidate):
            return candidate
    return None


def _read_fp8_or_fp4(ckpt: Checkpoint, quant: Quantization, name: str, scale_name: str, shape: tuple[int, ...],
                     dtype: torch.dtype, device: str, index: int | None) -> Tensor:
    weight = ckpt.read_raw(name, index).to(device)
    scale = ckpt.read_raw(scale_name, index).to(device)
    if weight.dtype in (torch.int8, torch.uint8):  # FP4 pairs
        m, n = shape
        ckpt.check_shape(name, (m, n // 2), index)
        ckpt.check_shape(scale_name, (m, math.ceil(n / _MXFP4_GROUP)), index)
        return dequantize_fp4(weight, scale, dtype)
    ckpt.check_shape(name, shape, index)
    return dequantize_fp8(weight, scale, quant.block, dtype)


def dequantize_mxfp4(blocks: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """blocks [M, G, 16] u8, scales [M, G] u8 → [N, M] (N = 32 G) in `dtype` (transposed, see above)."""
    lut = torch.tensor(_FP4_VALUES, dtype=torch.float32, device=blocks.device)
    values = torch.stack([lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]], dim=-1)  # [M, G, 16, 2]
    values = values.reshape(*blocks.shape[:-1], -1)  # [M, G, 32]
    out = torch.ldexp(values, scales.to(torch.int32)[..., None] - 127).reshape(blocks.shape[0], -1)  # [M, N]
    return out.t().contiguous().to(dtype)


def dequantize_int4(packed: Tensor, scale: Tensor, shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """packed [M, ceil(N/8)] i32, scale [M, ceil(N/group)] → [M, N] in `dtype`."""
    m, n = shape
    nibbles = packed.contiguous().view(torch.uint8)  # little-endian words: low nibble of byte 0 comes first
    q = torch.stack([nibbles & 0x0F, nibbles >> 4], dim=-1).reshape(m, -1)[:, :n].float() - 8.0
    group = math.ceil(n / scale.shape[-1])
    return (q * scale.float().repeat_interleave(group, dim=-1)[:, :n]).to(dtype)


def _read_int4(ckpt: Checkpoint, quant: Quantization, base: str, shape: tuple[int, ...], dtype: torch.dtype,
               device: str, index: int | None) -> Tensor:
    stored = tuple(int(v) for v in ckpt.read_raw(base + "weight_shape", index).tolist())
    if stored != tuple(shape):
        raise CheckpointError(f"{ckpt.root}: tensor {base}weight_shape says {list(stored)}, config.json implies "
                              f"{list(shape)}")
    m, n = shape
    ckpt.check_shape(base + "weight_packed", (m, math.ceil(n / 8)), index)
    ckpt.check_shape(base + "weight_scale", (m, math.ceil(n / quant.group)), index)
    packed = ckpt.read_raw(base + "weight_packed", index).to(device)
    scale = ckpt.read_raw(base + "weight_scale", index).to(device)
    return dequantize_int4(packed, scale, (m, n), dtype)


def read_weight(ckpt: Checkpoint, quant: Quantization, name: str, shape: tuple[int, ...], dtype: torch.dtype,
                device: str, index: int | None = None) -> Tensor:
    """One weight in `dtype` on `device`, dequantised if the checkpoint stores it quantised."""
    scale_name = _scale_name(ckpt, name) if quant.method == "fp8" else None
    if scale_name is not None:
        return _read_fp8_or_fp4(ckpt, quant, name, scale_name, shape, dtype, device, index)
    if quant.method == "mxfp4" and ckpt.has(name + "_blocks"):
        out, n_in = shape[-1], shape[-2]
        ckpt.check_shape(name + "_blocks", (out, n_in // _MXFP4_GROUP, _MXFP4_GROUP // 2), index)
        blocks = ckpt.read_raw(name + "_blocks", index).to(device)
        scales = ckpt.read_raw(name + "_scales", index).to(device)
        return dequantize_mxfp4(blocks, scales, dtype)
    if quant.method == "int4" and name.endswith(".weight") and ckpt.has(name + "_packed"):
        return _read_int4(ckpt, quant, name[:-len("weight")], shape, dtype, device, index)
    return ckpt.read(name, shape, dtype, device, index)
