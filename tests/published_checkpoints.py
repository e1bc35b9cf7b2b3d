"""Tiny checkpoints of published configs: built with transformers, stored as the releases are.

Each build writes two directories:
- `ours`: config.json exactly as published (sizes shrunk), weights in bf16 as released;
  FP8 releases (DeepSeek-V3/R1, Kimi-K2) re-stored as F8_E4M3 with 128x128 `weight_scale_inv`
  blocks, gpt-oss's experts as MXFP4 `_blocks` / `_scales`, Kimi-K2-Thinking's routed experts as
  compressed-tensors INT4 (`weight_packed` / `weight_scale` / `weight_shape`, packed by compressed-tensors).
- `reference`: what transformers loads as the reference: its own config, and the quantised
  tensors dequantised by code that is not ours (a block loop here; transformers' own
  MXFP4 dequantiser), so the reference runs on the dequantised weights.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.published_configs import tiny

_FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_ZERO_CENTRED_NORMS = ("qwen3_next", "qwen3_5_moe_text")
_NOT_FOR_TRANSFORMERS = ("auto_map", "architectures", "transformers_version", "torch_dtype", "dtype",
                         "quantization_config")


def quantize_fp8(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """w [M, N] → F8_E4M3 weight and one fp32 scale_inv per block (the last block may be partial)."""
    m, n = w.shape
    rows, cols = math.ceil(m / block), math.ceil(n / block)
    scale = torch.zeros(rows, cols)
    q = torch.empty(m, n, dtype=torch.float8_e4m3fn)
    for i in range(rows):
        for j in range(cols):
            tile = w[i * block:(i + 1) * block, j * block:(j + 1) * block].float()
            scale[i, j] = tile.abs().max().clamp(min=1e-12) / 448.0
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (tile / scale[i, j]).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_fp8_blockwise(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    out = q.float()
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            out[i * block:(i + 1) * block, j * block:(j + 1) * block] *= scale[i, j]
    return out


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N] → blocks [..., N/32, 16] u8 (low nibble first) and scales [..., N/32] u8 (exponent + 127)."""
    groups = w.float().reshape(*w.shape[:-1], -1, 32)
    amax = groups.abs().amax(-1, keepdim=True)
    exp = torch.where(amax > 0, torch.ceil(torch.log2(amax / 6.0)), torch.zeros_like(amax))
    scaled = groups / torch.exp2(exp)
    idx = (scaled.abs()[..., None] - _FP4).abs().argmin(-1) + 8 * (scaled < 0)  # nearest E2M1 value, sign bit
    packed = (idx[..., 0::2] | (idx[..., 1::2] << 4)).to(torch.uint8)
    return packed, (exp[..., 0] + 127).to(torch.uint8)


def _quantize_fp8_file(tensors: dict) -> tuple[dict, dict]:
    """DeepSeek's and MiniMax's FP8 releases: every *_proj linear and Mixtral-style expert (w1/w2/w3),
    not embeddings, lm_head, norms or the router."""
    ours, reference = {}, {}
    for name, t in tensors.items():
        # MiniMax's w1/w2/w3 experts; DSA: the indexer's projections too
        if name.endswith(("_proj.weight", ".w1.weight", ".w2.weight", ".w3.weight", "indexer.wq_b.weight",
                          "indexer.wk.weight")):
            q, scale = quantize_fp8(t)
            ours[name], ours[name + "_scale_inv"] = q, scale
            reference[name] = dequantize_fp8_blockwise(q, scale)
        else:
            ours[name] = reference[name] = t
    return ours, reference


def _quantize_mxfp4_file(tensors: dict) -> tuple[dict, dict]:
    """gpt-oss's release: expert matrices as MXFP4 in [E, out, in] order."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    ours, reference = {}, {}
    for name, t in tensors.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = quantize_mxfp4(t.transpose(-1, -2))  # stored [E, in, out], quantised along in
            ours[name + "_blocks"], ours[name + "_scales"] = blocks, scales
            reference[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
        else:
            ours[name] = reference[name] = t
    return ours, reference


# Stand-ins for the wrapper's vision tensors (names as released): present on disk, never read.
_LLAMA4_VISION = {"vision_model.patch_embedding.linear.weight": torch.zeros(8, 8, dtype=torch.bfloat16),
                  "multi_modal_projector.linear_1.weight": torch.zeros(8, 8, dtype=torch.bfloat16)}


def quantize_int4(w: torch.Tensor, group: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """w [M, N] → int8 values in [-8, 7] and one bf16 scale per `group` columns (symmetric, amax / 7)."""
    groups = w.float().reshape(w.shape[0], -1, group)
    scale = (groups.abs().amax(-1) / 7.0).clamp(min=1e-8).to(torch.bfloat16)
    q = torch.round(groups / scale.float()[..., None]).clamp(-8, 7).to(torch.int8)
    return q.reshape(w.shape), scale


def _quantize_int4_file(tensors: dict, group: int = 32) -> tuple[dict, dict]:
    """Kimi-K2-Thinking's release: routed experts' linears INT4 (its `ignore` list keeps attention, shared
    experts, dense MLPs and lm_head in bf16), packed and unpacked by compressed-tensors itself."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    ours, reference = {}, {}
    for name, t in tensors.items():
        if ".mlp.experts." in name and name.endswith("_proj.weight"):
            q, scale = quantize_int4(t, group)
            base = name[:-len("weight")]
            packed = pack_to_int32(q, 4)
            ours[base + "weight_packed"], ours[base + "weight_scale"] = packed, scale
            ours[base + "weight_shape"] = torch.tensor(t.shape)
            reference[name] = unpack_from_int32(packed, 4, t.shape).float() * scale.float().repeat_interleave(group, -1)
        else:
            ours[name] = reference[name] = t
    return ours, reference


# Recurrent layers' decay as trained models have it. transformers' init forgets at once: exp(A_log) up to 16 (Qwen3-Next),
# up to the head count with dt_bias 1 (Granite 4.0-H), up to ssm_state_size (Jamba); Nemotron-H's small dt_bias writes
# almost nothing into its state, and its conv taps (std 0.02, not torch's ±1/√K) leave B and C too faint for the state
# to move the logits. A state forgotten within a token, or too faint to matter, would let a state lost on preemption,
# dropped at a prefill chunk boundary or handed to another sequence go unseen. With exp(A_log) from 0.005 to 0.05
# and dt_bias (Jamba: dt_proj's bias) 1, a token's decay is about exp(-0.0065) to exp(-0.065): the state carries over
# tens of tokens, across steps and chunks (measured in the issue-19 report). transformers is given the same weights.
SLOW_A = (0.005, 0.05)


def _slow_decay(model) -> None:
    """Every Mamba / gated DeltaNet layer's decay (A_log) from SLOW_A, its step bias 1 and its conv taps as torch's
    Conv1d draws them (uniform ±1/√K), in place; a model without such layers is left as it is."""
    if not any(name.endswith(".A_log") for name, _ in model.named_parameters()):
        return
    for name, param in model.named_parameters():
        if name.endswith(".A_log"):
            exp_a = torch.linspace(*SLOW_A, param.numel()).reshape(param.shape)
            param.copy_(exp_a.log())
        elif name.endswith((".dt_bias", ".dt_proj.bias")):
            param.fill_(1.0)
        elif name.endswith(".conv1d.weight"):
            bound = param.shape[-1] ** -0.5
            param.uniform_(-bound, bound)


# Granite's tied embeddings enter the residual ×12 (embedding_multiplier) and its branches ×0.22: at transformers'
# init the last token's own embedding outweighs every layer, greedy decoding repeats it and sampling is all but
# uniform over the 100k vocabulary, so no output depends on the recurrent state. Embeddings ×20 (logits that pick)
# and the residual branches' output projections ×100 (context that outweighs the token) make it depend.
GRANITE_EMBED, GRANITE_BRANCH = 20.0, 100.0


def _context_over_token(model) -> None:
    for name, param in model.named_parameters():
        if name.endswith("embed_tokens.weight"):
            param.mul_(GRANITE_EMBED)
        elif name.endswith(("out_proj.weight", "o_proj.weight", "experts.down_proj", "output_linear.weight")):
            param.mul_(GRANITE_BRANCH)


def _transformers_model(cfg: dict, seed: int):
    """transformers' model of `cfg`; a multimodal wrapper's text model (text-only requests)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if cfg["model_type"] == "llama4":  # served as the text model it wraps (the vision tower is not built)
        # the release says attn_temperature_tuning 4, which transformers 5's strict config refuses (a bool)
        cfg = {**cfg["text_config"], "attn_temperature_tuning": bool(cfg["text_config"].get("attn_temperature_tuning", 1))}
    cfg = cfg.get("text_config") or cfg
    kwargs = {k: v for k, v in cfg.items() if k not in _NOT_FOR_TRANSFORMERS}
    model_type = kwargs.pop("model_type")
    model_type = "deepseek_v3" if model_type == "kimi_k2" else model_type  # transformers has no kimi_k2
    if model_type == "dbrx" and "rope_theta" in kwargs["attn_config"]:
        # transformers 5 reads rope_theta only at the top level and runs DBRX at 10000, not the released
        # attn_config.rope_theta (500000): the reference is given the released value.
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": kwargs["attn_config"]["rope_theta"]}
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kwargs)).eval()
    with torch.no_grad():  # buffers transformers zero-initialises: random, so they change the outcome
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape) * 0.02)
        if model_type in _ZERO_CENTRED_NORMS:  # (1 + w) norms start at w = 0: random, so the offset is tested
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.add_(torch.randn(param.shape) * 0.2)
        _slow_decay(model)
        if model_type == "granitemoehybrid":
            _context_over_token(model)
        if model_type == "gemma4_text":  # norms, router scales and layer scalars start at one: random, so tested
            for name, t in [*model.named_parameters(), *model.named_buffers()]:
                if name.endswith(("weight", "scale", "layer_scalar")) and bool((t == 1).all()):
                    t.mul_(1 + 0.3 * torch.randn(t.shape))
    return model


# A vision tower and projector as Kimi-K2.5 stores them beside its text model: never to be read.
_KIMI_K25_VISION = {"vision_tower.patch_embed.proj.weight": (32, 3, 14, 14), "vision_tower.encoder.blocks.0.wqkv.weight":
                    (96, 32), "vision_tower.encoder.blocks.0.norm0.weight": (32,), "mm_projector.pre_norm.weight": (32,),
                    "mm_projector.proj.0.weight": (64, 128), "mm_projector.proj.2.weight": (64, 64)}


def _wrap_kimi_k25(tensors: dict) -> dict:
    """Kimi-K2.5's release layout: the text model under language_model.*, the vision modules beside it."""
    out = {("language_model." + n if n.startswith(("model.", "lm_head.")) else n): t for n, t in tensors.items()}
    return {**out, **{n: torch.randn(shape).to(torch.bfloat16) for n, shape in _KIMI_K25_VISION.items()}}


# Qwen3.5's release beside its text model: a vision tower and the multi-token-prediction layer, never read.
_QWEN3_5_EXTRA = {"model.visual.patch_embed.proj.weight": (32, 3, 2, 16, 16), "model.visual.merger.norm.weight": (32,),
                  "mtp.fc.weight": (64, 128), "mtp.pre_fc_norm_hidden.weight": (64,)}


def _wrap_qwen3_5(tensors: dict) -> dict:
    """Qwen3.5's release layout: the text model under model.language_model.*, lm_head.* beside it."""
    out = {("model.language_model." + n[len("model."):] if n.startswith("model.") else n): t for n, t in tensors.items()}
    return {**out, **{n: torch.randn(shape).to(torch.bfloat16) for n, shape in _QWEN3_5_EXTRA.items()}}


# Gemma 4's release beside its text model: a vision tower and its embedder, never read.
_GEMMA4_VISION = {"model.vision_tower.encoder.layers.0.self_attn.q_proj.linear.weight": (32, 32),
                  "model.vision_tower.patch_embedder.input_proj.weight": (32, 768),
                  "model.embed_vision.embedding_projection.weight": (64, 32)}


def _wrap_gemma4(tensors: dict) -> dict:
    """Gemma 4's release layout: the text model under model.language_model.* (its LM head tied, not stored)."""
    out = {("model.language_model." + n[len("model."):] if n.startswith("model.") else n): t for n, t in tensors.items()}
    return {**out, **{n: torch.randn(shape).to(torch.bfloat16) for n, shape in _GEMMA4_VISION.items()}}


def build(name: str, root: Path, seed: int = 0, overrides: dict | None = None) -> tuple[Path, Path]:
    """(ours, reference) checkpoint directories for the published config `name`. A multimodal
    wrapper's reference is its text model alone (what a text-only request runs)."""
    cfg = {**tiny(name), **(overrides or {})}
    ours, reference = root / "ours", root / "reference"
    _transformers_model(cfg, seed).to(torch.bfloat16).save_pretrained(reference)
    tensors = load_file(reference / "model.safetensors")
    method = ((cfg.get("text_config") or cfg).get("quantization_config") or {}).get("quant_method")
    quantize = {"fp8": _quantize_fp8_file, "mxfp4": _quantize_mxfp4_file,
                "compressed-tensors": _quantize_int4_file}.get(method)
    ours_tensors, ref_tensors = quantize(tensors) if quantize else (tensors, tensors)
    if cfg["model_type"] == "llama4":  # released as the multimodal wrapper: text weights under language_model.
        ours_tensors = {**{"language_model." + k: v for k, v in ours_tensors.items()}, **_LLAMA4_VISION}
    if cfg.get("model_type") == "kimi_k25":
        ours_tensors = _wrap_kimi_k25(ours_tensors)
    if cfg.get("model_type") == "qwen3_5_moe":
        ours_tensors = _wrap_qwen3_5(ours_tensors)
    if cfg.get("model_type") == "gemma4":
        ours_tensors = _wrap_gemma4(ours_tensors)
    ours.mkdir(parents=True)
    save_file(ours_tensors, ours / "model.safetensors")
    (ours / "config.json").write_text(json.dumps(cfg, indent=2))
    if quantize:
        save_file(ref_tensors, reference / "model.safetensors")
    return ours, reference
