"""DeepSeek Sparse Attention models: DeepSeek-V3.2 (`deepseek_v32`) and GLM-5 (`glm_moe_dsa`).
DeepSeek-V3's MLA and gating, plus a lightning indexer per layer: its heads score every cached
key for each query (Σ_h weight_h · relu(q_h · k)), and attention runs over the index_topk best.
Up to index_topk tokens of context this is dense MLA. The indexer's key is cached beside the
rotary key (cluster.model.kv_cache). V3.2's indexer rotates halves, GLM-5's interleaved pairs.
GLM's cross-layer sharing of one layer's selection ("shared" indexer_types) is refused."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from cluster.config import ModelConfig
from cluster.families.base import Family, refuse_if, require
from cluster.families.deepseek import TENSORS, parse_v3
from cluster.families.glm4_moe_lite import moe_layer_types

_INDEXER = "model.layers.{layer}.self_attn.indexer."
DSA_TENSORS = {
    **TENSORS,
    "index_q": _INDEXER + "wq_b.weight",
    "index_k": _INDEXER + "wk.weight",
    "index_k_norm": _INDEXER + "k_norm.weight",
    "index_k_norm_bias": _INDEXER + "k_norm.bias",
    "index_weights": _INDEXER + "weights_proj.weight",
}


def _shared_layers(cfg: dict[str, Any], num_layers: int) -> list[int]:
    """Layers that reuse another layer's selection, as transformers' GlmMoeDsaConfig derives them."""
    types = cfg.get("indexer_types")
    if types is None and cfg.get("index_topk_pattern") is not None:
        pattern = cfg["index_topk_pattern"]
        types = [{"F": "full", "S": "shared"}[c] for c in pattern] if isinstance(pattern, str) else list(pattern)
    if types is None:
        freq, offset = max(int(cfg.get("index_topk_freq", 1)), 1), int(cfg.get("index_skip_topk_offset", 2))
        types = ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(num_layers)]
    return [i for i, t in enumerate(types) if t != "full"]


def _parse(cfg: dict[str, Any], glm: bool) -> ModelConfig:
    parsed = moe_layer_types(cfg, parse_v3(cfg))
    refuse_if(not parsed.q_lora_rank, "q_lora_rank", "the DSA indexer reads the q latent, so it needs one")
    types = cfg.get("layer_types")
    refuse_if(types is not None and set(types) != {"indexed_attention"}, "layer_types",
              f"{types!r}: only 'indexed_attention' layers")
    if glm:
        shared = _shared_layers(cfg, parsed.num_layers)
        refuse_if(bool(shared), "indexer_types", f"layers {shared} reuse another layer's top-k ('shared'); "
                  "cross-layer sharing is not implemented")
    head_dim = int(require(cfg, "index_head_dim"))
    refuse_if(head_dim < parsed.qk_rope_head_dim, "index_head_dim",
              f"{head_dim} is narrower than qk_rope_head_dim {parsed.qk_rope_head_dim}")
    return replace(parsed, index_topk=int(require(cfg, "index_topk")), index_n_heads=int(require(cfg, "index_n_heads")),
                   index_head_dim=head_dim, index_rope_interleave=glm)


V32 = Family("deepseek_v32", lambda cfg: _parse(cfg, glm=False), DSA_TENSORS)
GLM_DSA = Family("glm_moe_dsa", lambda cfg: _parse(cfg, glm=True), DSA_TENSORS)
