"""The gated delta rule on flash-linear-attention's Triton kernels (`pip install flash-linear-attention`).

Prefill: every prefill chunk of a step in one varlen `chunk_gated_delta_rule` call (batch 1, the chunks
packed along time, `cu_seqlens` their bounds, one initial state per chunk); decode: one
`fused_recurrent_gated_delta_rule` over the B decoding sequences (batch B, one token each). Both take q and
k before their L2 norm (`use_qk_l2norm_in_kernel`, eps 1e-6 as ours), the Hk key heads as they are (value
head h reads key head h // (Hv / Hk), our repeat_interleave), the default scale 1/√dk, g the log-decay in
fp32 and beta after its sigmoid; the states [N, Hv, dk, dv] fp32 ("K-first", fla's default layout, ours).
q, k, v stay in the model's dtype: the kernels accumulate in fp32 and return the state in fp32.
Imported only when chosen (linear_attention_backend.py): Triton may fail to import on a CPU-only machine.
Shapes: P packed prefill rows, N chunks, B decoding sequences.
"""
from __future__ import annotations

import inspect
from functools import partial
from typing import Callable

from torch import Tensor

from cluster.model.deltanet import DeltaRule


def fla_prefill(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, states: Tensor, cu_seqlens: Tensor,
                cu_seqlens_cpu: Tensor, *, chunk: Callable, host_bounds: bool) -> tuple[Tensor, Tensor]:
    """As deltanet.chunked_prefill: q, k [P, Hk, dk], v [P, Hv, dv], g, beta [P, Hv], states [N, Hv, dk, dv],
    cu_seqlens [N + 1] and the same on the host → out [P, Hv, dv], the N final states. `chunk`: fla's
    chunk_gated_delta_rule; given the host bounds (`host_bounds`: its version takes them) it plans its
    chunks without reading the device's."""
    host = {"cu_seqlens_cpu": cu_seqlens_cpu} if host_bounds else {}
    out, final = chunk(q[None], k[None], v[None], g=g[None].float(), beta=beta[None], initial_state=states.float(),
                       output_final_state=True, cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=True,
                       **host)  # [1, P, ..]
    return out[0], final


def fla_decode(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, states: Tensor,
               *, recurrent: Callable) -> tuple[Tensor, Tensor]:
    """As deltanet.recurrent_step: q, k [B, Hk, dk], v [B, Hv, dv], g, beta [B, Hv], states [B, Hv, dk, dv]
    → out [B, Hv, dv], the new states. `recurrent`: fla's fused_recurrent_gated_delta_rule."""
    # by keyword: its positional order is q, k, v, g, gk, gv, beta
    out, final = recurrent(q[:, None], k[:, None], v[:, None], g=g[:, None].float(), beta=beta[:, None],
                           initial_state=states.float(), output_final_state=True,
                           use_qk_l2norm_in_kernel=True)  # [B, 1, ..]: B sequences of one token
    return out[:, 0], final


def fla_rule(chunk: Callable | None = None, recurrent: Callable | None = None) -> DeltaRule:
    """The DeltaRule on fla's kernels (by default the installed ones; tests pass stand-ins with their
    signature)."""
    if chunk is None or recurrent is None:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
        chunk, recurrent = chunk or chunk_gated_delta_rule, recurrent or fused_recurrent_gated_delta_rule
    host_bounds = "cu_seqlens_cpu" in inspect.signature(chunk).parameters  # fla 0.5 has it; older ones not
    return DeltaRule("fla", partial(fla_prefill, chunk=chunk, host_bounds=host_bounds),
                     partial(fla_decode, recurrent=recurrent))
