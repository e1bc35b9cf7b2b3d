"""DeepSeek-V4-Flash's config.json (every field as released, sizes shrunk) and tiny checkpoints of it
stored under the release's own tensor names (`layers.N.attn.wq_a.weight`, `layers.N.ffn.experts.E.w1.weight`,
`hc_head_fn`, an `mtp.*` layer that must never be read).

The config is recalled from the release and checked against transformers 5.24's DeepseekV4Config
defaults (which are V4-Flash's) and public copies of its fields (vLLM / vllm-ascend tests: rope_scaling,
compress_ratios as 0 / 4 / 128 per layer plus one for the MTP layer, swiglu_limit, sliding_window).
The reference is transformers' model loaded from those same files (its conversion mapping renames the
release's tensors), so our names are checked against transformers' reading of the release.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

FLASH = {
    "architectures": ["DeepseekV4ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 0,
    "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0], "compress_rope_theta": 160000, "eos_token_id": 1,
    "expert_dtype": "fp4", "hc_eps": 1e-06, "hc_mult": 4, "hc_sinkhorn_iters": 20, "head_dim": 512,
    "hidden_act": "silu", "hidden_size": 4096, "index_head_dim": 128, "index_n_heads": 64, "index_topk": 512,
    "initializer_range": 0.02, "max_position_embeddings": 1048576, "model_type": "deepseek_v4",
    "moe_intermediate_size": 2048, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 64, "num_experts_per_tok": 6, "num_hash_layers": 3, "num_hidden_layers": 43,
    "num_key_value_heads": 1, "num_nextn_predict_layers": 1, "o_groups": 8, "o_lora_rank": 1024, "q_lora_rank": 1024,
    "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "scale_fmt": "ue8m0",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 16, "original_max_position_embeddings": 65536,
                     "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.5, "scoring_func": "sqrtsoftplus", "sliding_window": 128,
    "swiglu_limit": 10.0, "tie_word_embeddings": False, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.57.1", "use_cache": True, "vocab_size": 129280,
}
# Sizes only: 4 layers (window only, CSA, HCA, CSA; the first three hash-routed as released), heads of 32
# with 8 rotary features, 16 experts. Window, ratios, top-k, hc_mult, index_topk stay as released.
SIZES = {"hidden_size": 64, "num_attention_heads": 4, "head_dim": 32, "qk_rope_head_dim": 8, "q_lora_rank": 32,
         "o_groups": 2, "o_lora_rank": 16, "num_hidden_layers": 4, "compress_ratios": [0, 4, 128, 4, 0],
         "moe_intermediate_size": 32, "n_routed_experts": 16, "index_n_heads": 4, "index_head_dim": 16,
         "vocab_size": 256}

# transformers' names → the release's (the inverse of transformers' conversion_mapping for deepseek_v4).
_RENAMES = [  # applied in order to a transformers name without its "model." prefix
    (".self_attn.compressor.indexer.scorer.weights_proj.", ".attn.indexer.weights_proj."),
    (".self_attn.compressor.indexer.q_b_proj.", ".attn.indexer.wq_b."),
    (".self_attn.compressor.indexer.", ".attn.indexer.compressor."),
    (".self_attn.", ".attn."), (".mlp.", ".ffn."),
    (".input_layernorm.", ".attn_norm."), (".post_attention_layernorm.", ".ffn_norm."),
    (".attn_hc.fn", ".hc_attn_fn"), (".attn_hc.base", ".hc_attn_base"), (".attn_hc.scale", ".hc_attn_scale"),
    (".ffn_hc.fn", ".hc_ffn_fn"), (".ffn_hc.base", ".hc_ffn_base"), (".ffn_hc.scale", ".hc_ffn_scale"),
    (".sinks", ".attn_sink"), (".compressor.kv_norm.", ".compressor.norm."), (".position_bias", ".ape"),
    (".q_a_proj.", ".wq_a."), (".q_b_proj.", ".wq_b."), (".kv_proj.", ".wkv."), (".gate_proj.", ".wgate."),
    (".o_a_proj.", ".wo_a."), (".o_b_proj.", ".wo_b."), (".q_a_norm.", ".q_norm."),
    (".gate.e_score_correction_bias", ".gate.bias"),
    (".shared_experts.wgate.", ".shared_experts.w1."), (".shared_experts.down_proj.", ".shared_experts.w2."),
    (".shared_experts.up_proj.", ".shared_experts.w3."),
]
_TOP = {"embed_tokens.weight": "embed.weight", "lm_head.weight": "head.weight", "norm.weight": "norm.weight",
        "hc_head.hc_fn": "hc_head_fn", "hc_head.hc_base": "hc_head_base", "hc_head.hc_scale": "hc_head_scale"}


def tiny_flash(**overrides) -> dict:
    """V4-Flash's config.json with only sizes changed, stored unquantised (the FP4 / FP8 release is
    part 2's), plus `overrides`."""
    cfg = copy.deepcopy(FLASH)
    cfg.update(copy.deepcopy(SIZES))
    cfg.pop("quantization_config")
    cfg.pop("expert_dtype")
    cfg.update(overrides)
    return cfg


def _released_name(name: str) -> str:
    name = name[len("model."):] if name.startswith("model.") else name
    if name in _TOP:
        return _TOP[name]
    for old, new in _RENAMES:
        name = name.replace(old, new)
    return name


def released_tensors(state: dict[str, torch.Tensor], num_experts: int) -> dict[str, torch.Tensor]:
    """transformers' state dict in the release's layout: experts one by one (w1 gate, w3 up, w2 down)."""
    out = {}
    for name, t in state.items():
        if name.endswith("experts.gate_up_proj"):
            base = _released_name(name[:-len("gate_up_proj")])
            for e in range(num_experts):
                gate, up = t[e].chunk(2, dim=0)
                out[f"{base}{e}.w1.weight"], out[f"{base}{e}.w3.weight"] = gate.contiguous(), up.contiguous()
        elif name.endswith("experts.down_proj"):
            base = _released_name(name[:-len("down_proj")])
            out.update({f"{base}{e}.w2.weight": t[e].contiguous() for e in range(num_experts)})
        else:
            out[_released_name(name)] = t.contiguous()
    return out


def _randomise(model, cfg: dict, seed: int) -> None:
    """What transformers zero-initialises changes nothing until trained: random here, so it counts —
    the sinks, biases, hash table (top-k distinct experts per token id) and selection bias."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith(("sinks", "position_bias", ".base", "hc_base", "e_score_correction_bias")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif name.endswith((".scale", "hc_scale")):
                p.copy_(1 + torch.randn(p.shape, generator=gen) * 0.1)
            elif name.endswith("tid2eid"):
                e = cfg["n_routed_experts"]
                p.copy_(torch.stack([torch.randperm(e, generator=gen)[:p.shape[1]] for _ in range(p.shape[0])]))


def build(root: Path, seed: int = 0, **overrides) -> Path:
    """A checkpoint directory as released (bf16 weights, fp32 where the release keeps them)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = tiny_flash(**overrides)
    skip = ("architectures", "transformers_version", "torch_dtype")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "deepseek_v4", **copy.deepcopy({k: v for k, v in cfg.items() if k not in skip and k != "model_type"}))).eval()
    _randomise(model, cfg, seed)
    keep_fp32 = ("hc_", "attn_sink", ".ape", "norm", "gate.bias", "tid2eid")
    tensors = {n: (t if n.endswith(keep_fp32) or "hc_" in n or t.dtype == torch.long else t.to(torch.bfloat16))
               for n, t in released_tensors(model.state_dict(), cfg["n_routed_experts"]).items()}
    d = cfg["hidden_size"]  # the MTP layer the release carries: never read by us nor by transformers
    tensors.update({"mtp.0.enorm.weight": torch.ones(d), "mtp.0.eh_proj.weight": torch.randn(d, 2 * d).to(torch.bfloat16)})
    root.mkdir(parents=True, exist_ok=True)
    save_file(tensors, root / "model.safetensors")
    (root / "config.json").write_text(json.dumps(cfg, indent=2))
    return root


def load_reference(path: Path):
    """transformers' model from the released files, in fp32."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


# As released: routed experts FP4 (E2M1 pairs in I8, a UE8M0 `.scale` per 32 values of a row); the attention
# projections and the shared expert FP8 e4m3 in 128x128 blocks with UE8M0 `.scale`; the compressors'
# projections, the indexer's weights_proj, the gates, norms, embeddings and head as they are (BF16 / FP32).
_FP4_MAGNITUDES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_FP8 = (".wq_a.weight", ".wq_b.weight", ".wkv.weight", ".wo_a.weight", ".wo_b.weight", "shared_experts.w1.weight",
        "shared_experts.w2.weight", "shared_experts.w3.weight")


def _ue8m0(amax: torch.Tensor, top: float) -> torch.Tensor:
    """The power-of-two exponent that brings `amax` within `top` (UE8M0 stores it biased by 127)."""
    return torch.ceil(torch.log2(amax.clamp(min=1e-30) / top)).clamp(-127, 127)


def quantize_fp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [M, N] → (packed I8 [M, N/2] low nibble first, UE8M0 scale [M, N/32], the dequantised [M, N])."""
    m, n = w.shape
    groups = w.float().view(m, n // 32, 32)
    exp = _ue8m0(groups.abs().amax(-1), 6.0)  # [M, N/32]
    q = groups / torch.exp2(exp)[..., None]
    idx = (q.abs()[..., None] - _FP4_MAGNITUDES).abs().argmin(-1)  # nearest magnitude
    nibble = (idx + 8 * (q < 0)).view(m, n).to(torch.uint8)
    packed = (nibble[:, 0::2] | (nibble[:, 1::2] << 4)).view(torch.int8)
    value = _FP4_MAGNITUDES[idx] * torch.where(q < 0, -1.0, 1.0) * torch.exp2(exp)[..., None]
    return packed, (exp + 127).to(torch.uint8).view(torch.float8_e8m0fnu), value.view(m, n)


def quantize_fp8_ue8m0(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [M, N] → (F8_E4M3, UE8M0 scale per block (the last may be partial), the dequantised [M, N])."""
    m, n = w.shape
    rows, cols = -(-m // block), -(-n // block)
    exp = torch.zeros(rows, cols)
    for i in range(rows):
        for j in range(cols):
            exp[i, j] = _ue8m0(w[i * block:(i + 1) * block, j * block:(j + 1) * block].float().abs().max(), 448.0)
    scale = torch.exp2(exp).repeat_interleave(block, 0)[:m].repeat_interleave(block, 1)[:, :n]
    q = (w.float() / scale).to(torch.float8_e4m3fn)
    return q, (exp + 127).to(torch.uint8).view(torch.float8_e8m0fnu), q.float() * scale


def build_quantized(root: Path, seed: int = 0, **overrides) -> tuple[Path, Path]:
    """(ours, reference): the release's FP4 / FP8 layout and config.json (quantization_config, expert_dtype),
    and the same weights dequantised by the code above (bf16 holds every such value exactly) without them."""
    reference = build(root / "reference", seed, **overrides)
    from safetensors.torch import load_file

    tensors, ours = load_file(str(reference / "model.safetensors")), {}
    dequantised = {}
    for name, t in tensors.items():
        fp4 = ".ffn.experts." in name
        if fp4 or (name.endswith(_FP8) and ".compressor." not in name):
            q, scale, value = quantize_fp4(t) if fp4 else quantize_fp8_ue8m0(t)
            ours[name], ours[name[:-len("weight")] + "scale"] = q, scale
            dequantised[name] = value.to(t.dtype)
        else:
            ours[name] = t
    save_file({**tensors, **dequantised}, reference / "model.safetensors")
    (root / "ours").mkdir()
    save_file(ours, root / "ours" / "model.safetensors")
    cfg = {**tiny_flash(**overrides), "quantization_config": copy.deepcopy(FLASH["quantization_config"]),
           "expert_dtype": FLASH["expert_dtype"]}
    (root / "ours" / "config.json").write_text(json.dumps(cfg, indent=2))
    return root / "ours", reference
