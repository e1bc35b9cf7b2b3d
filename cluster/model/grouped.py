"""Grouped expert compute: one layer's experts as stacked tensors, one grouped matmul per projection.

Shapes: N rows sorted by expert, S experts held in the stack (stack index s holds
expert_ids[s]), R row width (ModelConfig.expert_row_size), I expert intermediate.

The per-expert loop (`swiglu` on each expert's rows) launches two matmuls per
expert that got rows and needs the counts on the host; `torch.nn.functional.grouped_mm`
takes the counts as device offsets, so a layer costs two matmul calls whatever E is
and a GPU step never waits for the host. It is used where this torch runs it without a host sync
(`sync_free_reason`: CPU for any float dtype; CUDA only in bf16 on compute capability
9.x/10.x, where torch 2.13 has its CUTLASS kernel, while elsewhere `_grouped_mm_fallback`
copies the offsets to the host and loops, no better than our loop and not capturable)
and for the stack's shapes (probed once per stack: dims a multiple of 16 bytes);
elsewhere the loop. The reason a stack loops is logged and kept (`loop_reason`).
On this project's CPU it measured as fast as or faster than the loop and a padded
bmm (bench/expert_compute_bench.py).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

import logging

from cluster.model.layers import swiglu
from cluster.model.weights import ExpertActivation, MLPWeights

log = logging.getLogger("cluster.engine")
SYNC_FREE_CUDA_MAJORS = (9, 10)  # torch 2.13 GroupedBlas.cpp: CUTLASS grouped GEMM on SM90/SM100, bf16 only


@dataclass(frozen=True)
class ExpertStack:
    """One layer's held experts stacked along a first dimension (expert_ids ascending)."""

    expert_ids: tuple[int, ...]  # [S]
    index: Mapping[int, int]  # expert_id → its stack index
    gate_up: Tensor  # [S, 2I, D]
    down: Tensor  # [S, D, I]
    gate_up_bias: Tensor | None  # [S, 2I]
    down_bias: Tensor | None  # [S, D]
    activation: ExpertActivation
    loop_reason: str | None  # why the per-expert loop runs instead of grouped_mm; None: grouped

    @property
    def grouped(self) -> bool:
        return self.loop_reason is None

    def weights(self, s: int) -> MLPWeights:
        """Stack index s as an MLPWeights of views into the stack (no copy)."""
        bias = lambda t: None if t is None else t[s]  # noqa: E731
        return MLPWeights(self.gate_up[s], self.down[s], bias(self.gate_up_bias), bias(self.down_bias),
                          self.activation)


def stack_layer(experts: dict[int, MLPWeights]) -> ExpertStack:
    """expert_id → weights of one layer (same shapes, dtype and device) → one stack."""
    ids = tuple(sorted(experts))
    ws = [experts[e] for e in ids]
    maybe = lambda ts: None if ts[0] is None else torch.stack(ts)  # noqa: E731
    stack = ExpertStack(ids, {e: s for s, e in enumerate(ids)}, torch.stack([w.gate_up for w in ws]), torch.stack([w.down for w in ws]),
                        maybe([w.gate_up_bias for w in ws]), maybe([w.down_bias for w in ws]), ws[0].activation,
                        loop_reason="not probed")
    reason = _loop_reason(stack)
    if reason is not None:
        log.info("experts of one layer (%d, %s on %s) run as a per-expert loop: %s", len(ids), stack.gate_up.dtype,
                 stack.gate_up.device, reason)
    return replace(stack, loop_reason=reason)


def sync_free_reason(device: torch.device, dtype: torch.dtype, capability: tuple[int, int] | None) -> str | None:
    """Why grouped_mm would sync with the host on `device` at `dtype` (capability: the CUDA device's),
    or None when it does not."""
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"grouped_mm on {device.type} is not known to be sync-free"
    if capability is None or capability[0] not in SYNC_FREE_CUDA_MAJORS or dtype != torch.bfloat16:
        return (f"grouped_mm on compute capability {capability} in {dtype} is torch's fallback (offsets copied to "
                f"the host, one matmul per expert); it is sync-free only in bfloat16 on 9.x/10.x")
    return None


def _loop_reason(stack: ExpertStack) -> str | None:
    """None when grouped_mm runs sync-free on this stack's device, dtype and shapes and equals the loop
    on one row; else why not."""
    if not hasattr(F, "grouped_mm"):
        return "this torch has no grouped_mm"
    device, dtype = stack.gate_up.device, stack.gate_up.dtype
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    reason = sync_free_reason(device, dtype, capability)
    if reason is not None:
        return reason
    row = torch.ones(1, stack.gate_up.shape[-1], dtype=dtype, device=device)
    counts = torch.zeros(len(stack.expert_ids), dtype=torch.long, device=device)
    counts[0] = 1
    try:
        got = grouped_swiglu(row, stack, counts)
    except (RuntimeError, NotImplementedError, TypeError) as e:
        return f"grouped_mm refused these shapes ({type(e).__name__}: {str(e)[:200]})"
    want = swiglu_loop(row, stack, [1] + [0] * (len(counts) - 1))
    if not torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-2):
        return f"grouped_mm differs from the loop by {(got.float() - want.float()).abs().max().item():.3g} on one row"
    return None


def _bias(out: Tensor, bias: Tensor | None, counts: Tensor) -> Tensor:
    if bias is None:
        return out
    index = torch.repeat_interleave(torch.arange(bias.shape[0], device=out.device), counts,
                                   output_size=out.shape[0])  # [N]; output_size: no host sync
    return out + bias.index_select(0, index)


def grouped_swiglu(rows: Tensor, stack: ExpertStack, counts: Tensor) -> Tensor:
    """rows [N, R] sorted by stack index, counts [S] rows per stack index (on the rows' device) → [N, R]."""
    offs = counts.cumsum(0).to(torch.int32)  # [S] end of each stack index's rows
    gate_up = F.grouped_mm(rows, stack.gate_up.transpose(1, 2), offs=offs)  # [N, 2I] ([N, I] non-gated)
    hidden = stack.activation.apply(_bias(gate_up, stack.gate_up_bias, counts))  # [N, I]
    out = F.grouped_mm(hidden.contiguous(), stack.down.transpose(1, 2), offs=offs)  # [N, R]
    return _bias(out, stack.down_bias, counts)


def swiglu_loop(rows: Tensor, stack: ExpertStack, counts: Sequence[int]) -> Tensor:
    """The per-expert loop over the same stack (host counts per stack index)."""
    out, start = torch.empty_like(rows), 0
    for s, n in enumerate(counts):
        if n:
            out[start:start + n] = swiglu(rows[start:start + n], stack.weights(s))
            start += n
    return out


def run_stack(rows: Tensor, stack: ExpertStack, counts: Tensor | Sequence[int]) -> Tensor:
    """Rows sorted by stack index → outputs, computed in the stack's dtype and returned in the rows'."""
    x = rows.to(stack.gate_up.dtype)
    if stack.grouped:
        counts = counts if isinstance(counts, Tensor) else torch.tensor(list(counts), device=x.device)
        out = grouped_swiglu(x.contiguous(), stack, counts.to(x.device))
    else:
        out = swiglu_loop(x, stack, counts.tolist() if isinstance(counts, Tensor) else counts)
    return out.to(rows.dtype)
