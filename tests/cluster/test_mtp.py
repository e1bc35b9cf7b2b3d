"""Multi-token-prediction (draft) weights that releases carry and transformers does not model:
DeepSeek's `model.layers.61.*` and GLM's `model.layers.92.*` (one layer past num_hidden_layers),
Qwen's `mtp.*`. Stored as the releases store them (their own shard, listed in the index); loading
the whole model reads every byte but theirs, and they are never counted as experts."""
import json

import pytest
import torch
from safetensors.torch import save_file

from cluster.loader import load_backbone, load_experts, open_model
from cluster.sizing import format_sizing, sizing_from_config
from tests.published_checkpoints import build


def _decoder_layer(prefix: str, d: int, experts: int) -> dict[str, torch.Tensor]:
    """A full MoE decoder layer's worth of names, as the MTP modules carry one."""
    out = {f"{prefix}.input_layernorm.weight": torch.ones(d), f"{prefix}.post_attention_layernorm.weight": torch.ones(d),
           f"{prefix}.self_attn.o_proj.weight": torch.randn(d, d), f"{prefix}.mlp.gate.weight": torch.randn(experts, d)}
    for e in range(experts):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            out[f"{prefix}.mlp.experts.{e}.{proj}.weight"] = torch.randn(8, d)
    return out


def _mtp_tensors(style: str, layers: int, d: int, vocab: int, experts: int) -> dict[str, torch.Tensor]:
    if style == "deepseek":  # DeepSeek-V3 / GLM-4.5: layer num_hidden_layers, with its own embed and head
        p = f"model.layers.{layers}"
        extra = {f"{p}.embed_tokens.weight": torch.randn(vocab, d), f"{p}.enorm.weight": torch.ones(d),
                 f"{p}.hnorm.weight": torch.ones(d), f"{p}.eh_proj.weight": torch.randn(d, 2 * d),
                 f"{p}.shared_head.norm.weight": torch.ones(d), f"{p}.shared_head.head.weight": torch.randn(vocab, d)}
        return {**extra, **_decoder_layer(p, d, experts)}
    extra = {"mtp.fc.weight": torch.randn(d, 2 * d), "mtp.norm.weight": torch.ones(d),  # Qwen3-Next / Qwen3.5
             "mtp.pre_fc_norm_embedding.weight": torch.ones(d), "mtp.pre_fc_norm_hidden.weight": torch.ones(d)}
    return {**extra, **_decoder_layer("mtp.layers.0", d, experts)}


def _add_mtp_shard(path, tensors: dict[str, torch.Tensor]) -> None:
    """The release's layout: model weights and MTP weights in separate shards, one index."""
    (path / "model.safetensors").rename(path / "model-00001-of-00002.safetensors")
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()},
              path / "model-00002-of-00002.safetensors")
    from safetensors import safe_open
    with safe_open(path / "model-00001-of-00002.safetensors", "pt") as f:
        names = list(f.keys())
    weight_map = {**{n: "model-00001-of-00002.safetensors" for n in names},
                  **{n: "model-00002-of-00002.safetensors" for n in tensors}}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("name, style", [("DeepSeek-V3-BF16", "deepseek"), ("GLM-4.5-Air", "deepseek"),
                                         ("Qwen3-30B-A3B", "qwen")])
def test_mtp_weights_are_never_read_nor_counted(name, style, tmp_path):
    ours, _ = build(name, tmp_path)
    raw = json.loads((ours / "config.json").read_text())
    experts = raw.get("n_routed_experts") or raw.get("num_experts")
    mtp = _mtp_tensors(style, raw["num_hidden_layers"], raw["hidden_size"], raw["vocab_size"], experts)
    _add_mtp_shard(ours, mtp)

    ckpt, family, cfg = open_model(str(ours))
    model_bytes = sum(info.nbytes for n, info in ckpt.tensors.items() if n not in mtp)
    assert all(n in ckpt.tensors for n in mtp)  # the index lists them: they are there, and skipped
    load_backbone(ckpt, family, cfg)
    load_experts(ckpt, family, cfg, cfg.experts())
    assert ckpt.bytes_read == model_bytes  # every model byte, not one MTP byte
    assert cfg.num_layers == raw["num_hidden_layers"]
    assert len(cfg.experts()) == sum(cfg.moe_layers) * experts  # MTP experts are no expert slots
    assert f"{len(cfg.experts())} routed" in format_sizing(sizing_from_config(str(ours), workers=2))
