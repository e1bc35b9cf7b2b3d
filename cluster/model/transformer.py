"""The MoE decoder: backbone (embeddings, attention, norms, LM head) plus MoE blocks.

Shapes: T rows of the ragged batch, B sequences, D hidden, V vocab.
The model knows nothing of Ray: where experts run is the ExpertExecutor's business.
With `overlap` the layers run as two micro-batches in ping-pong (overlap.py), so
remote experts compute one micro-batch while the router computes the other.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from cluster.config import ModelConfig
from cluster.model.attention import attention
from cluster.model.batch import Batch
from cluster.model.deltanet import TORCH_RULE, DeltaRule, gated_deltanet
from cluster.model.experts import ExpertExecutor, LocalExperts
from cluster.model.kv_cache import KVCache
from cluster.model.layers import norm, swiglu
from cluster.model.mamba import mamba
from cluster.model.mamba2 import mamba2
from cluster.model.mla import mla_attention
from cluster.model.moe import Routing, moe_begin
from cluster.model.overlap import MicroBatch, merged, micro_batches
from cluster.model.rope import Rotary
from cluster.model.weights import BackboneWeights, LayerWeights

# the linear layers' mixer, by ModelConfig.linear_kind
_LINEAR = {"deltanet": gated_deltanet, "mamba2": mamba2, "mamba": mamba}


class MoETransformer:
    def __init__(self, cfg: ModelConfig, weights: BackboneWeights, experts: ExpertExecutor,
                 max_len: int, device: str = "cpu", overlap: bool | None = None, paged_attention=None,
                 delta_rule: DeltaRule = TORCH_RULE):
        """overlap: pipeline two micro-batches through the layers (steps of ≥ 2 sequences); None = auto:
        on for remote experts and a GPU router. Off for in-process experts (they compute inside
        `submit`: nothing to overlap) and on a CPU router, where the split costs more backbone time
        than it hides unless the experts dominate (served demo on 2 cores: 692 tok/s on, 763 off;
        docs/benchmarks.md).
        paged_attention: the attention backend's paged kernels (attention_backend.make_backend; None: SDPA).
        delta_rule: the kernels of the gated DeltaNet layers' delta rule (linear_attention_backend.delta_rule)."""
        self.cfg, self.weights, self.experts = cfg, weights, experts
        auto = not isinstance(experts, LocalExperts) and device.startswith("cuda")
        self.overlap = auto if overlap is None else overlap
        self.rotary = Rotary(cfg.rope, max_len, device)
        self.paged_attention = paged_attention
        self.embedding_multiplier = cfg.embedding_multiplier
        self._attend = mla_attention if cfg.attention == "mla" else partial(attention, paged=paged_attention)
        self.delta_rule = delta_rule
        linear = _LINEAR[cfg.linear_kind]
        self._linear = partial(linear, rule=delta_rule) if linear is gated_deltanet else linear

    def _norm(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return norm(x, weight, bias, self.cfg.rms_norm_eps, self.cfg.norm)

    def _residual(self, x: Tensor, h: Tensor) -> Tensor:
        scale = self.cfg.residual_multiplier
        return x + (h * scale if scale != 1.0 else h)

    @torch.inference_mode()
    def forward(self, batch: Batch, cache: KVCache, rows: Tensor | None = None) -> tuple[Tensor, list[Routing]]:
        """Run the batch's new tokens; return the logits of `rows` (default: each chunk's last token,
        [B, V]) and the routing."""
        cfg = self.cfg
        self.experts.begin_step()
        x = self.weights.embed[batch.token_ids]  # [T, D]
        if self.embedding_multiplier != 1.0:
            x = x * self.embedding_multiplier
        parts = micro_batches(batch, x, self.rotary.at(batch.positions, batch.chunks), self.overlap)
        for layer, w in enumerate(self.weights.layers):
            for part in parts:
                self._layer(part, layer, w, cache)
        for part in parts:
            self._finish_moe(part)
        x, routing = merged(parts)
        last = self._norm(x[batch.last_rows if rows is None else rows], self.weights.final_norm,
                          self.weights.final_norm_bias)  # [B, D]
        logits = F.linear(last, self.weights.lm_head, self.weights.lm_head_bias).float()  # [B, V]
        if cfg.final_logit_softcapping:  # Gemma 4: tanh keeps them within ± the cap
            logits = torch.tanh(logits / cfg.final_logit_softcapping) * cfg.final_logit_softcapping
        return (logits / cfg.logits_scaling if cfg.logits_scaling != 1.0 else logits), routing

    def _layer(self, part: MicroBatch, layer: int, w: LayerWeights, cache: KVCache) -> None:
        """One micro-batch through one layer: first the previous layer's MoE output (in flight while
        the other micro-batch ran), then attention, then this layer's MLP or the start of its MoE."""
        cfg = self.cfg
        self._finish_moe(part)
        if w.attn is not None:  # None: a Nemotron-H MLP / MoE block
            attend = self._linear if cfg.is_linear(layer) else self._attend
            h = attend(self._norm(part.x, w.attn_norm, w.attn_norm_bias), w.attn, cfg, layer, part.batch, cache,
                       part.rope)
            part.x = self._residual(part.x, h)
        if w.mlp_norm is None:  # a Nemotron-H mixer block
            return
        h = self._norm(part.x, w.mlp_norm, w.mlp_norm_bias)
        if w.gate is None:
            part.x = self._residual(part.x, swiglu(h, w.dense))
        else:
            part.in_flight = moe_begin(h, w, layer, cfg.gating, self.experts, cfg.gate_fp32, cfg.moe_input_scaled)

    def _finish_moe(self, part: MicroBatch) -> None:
        if part.in_flight is not None:
            h, routing = part.in_flight.finish()
            part.in_flight = None
            part.routing.append(routing)
            part.x = self._residual(part.x, h)
