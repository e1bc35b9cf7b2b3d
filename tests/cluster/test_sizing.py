"""`moe-cluster plan` figures: parameter counts against checkpoints built with transformers
(sum(p.numel()), active = non-expert + top_k experts), bytes against what the engine loads."""
import json
from pathlib import Path

import pytest
import torch

from cluster.engine import LLMEngine
from cluster.families import resolve
from cluster.sizing import ParamCounts, backbone_bytes, parse_bytes, size, sizing_from_config
from tests.published_checkpoints import _transformers_model, build
from tests.published_configs import PUBLISHED, tiny

DOCS = Path(__file__).resolve().parents[2] / "docs" / "configs"


def _ours(cfg: dict):
    family, text = resolve(cfg)
    return family.parse_config(text)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_transformers(name):
    cfg = tiny(name)
    model = _transformers_model(cfg, seed=0)
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n and "shared_expert" not in n)
    ours = _ours(cfg)
    active = total - routed * (ours.num_experts - ours.top_k) // ours.num_experts
    counts = ParamCounts.of(ours)
    assert (counts.total, counts.active, counts.routed_experts) == (total, active, routed)


@pytest.mark.parametrize("name", ["DeepSeek-V3-BF16", "GLM-4.5-Air", "gpt-oss-20b", "Phi-3.5-MoE-instruct",
                                  "granite-3.1-3b-a800m-instruct", "gemma-4-26B-A4B-it"])
def test_planned_bytes_are_what_the_engine_loads(name, tmp_path):
    ours, _ = build(name, tmp_path)
    for dtype in (torch.float32, torch.bfloat16):
        engine = LLMEngine.from_pretrained(str(ours), dtype=dtype, max_num_seqs=1, max_model_len=64)
        cfg = engine.cfg
        experts = len(cfg.experts()) * cfg.expert_bytes(dtype)
        assert engine.memory["backbone_bytes"] == backbone_bytes(cfg, dtype)
        assert engine.memory["weights_bytes"] == backbone_bytes(cfg, dtype) + experts
        p = size(cfg, dtype=dtype, kv_dtype=dtype, workers=0, gpu_memory_bytes=1 << 30, max_model_len=64,
                 max_num_seqs=1)
        assert p.router_weight_bytes == engine.memory["weights_bytes"]
        assert p.kv_bytes_per_token == engine.cache.bytes_per_token


def test_published_figures():
    mixtral = sizing_from_config(str(DOCS / "Mixtral-8x7B-Instruct-v0.1.json"), workers=4)
    assert round(mixtral.total_params / 1e9, 1) == 46.7 and round(mixtral.active_params / 1e9, 1) == 12.9
    assert mixtral.kv_bytes_per_token == 32 * 2 * 8 * 128 * 2 and mixtral.fits
    v3 = sizing_from_config(str(DOCS / "DeepSeek-V3.json"), workers=4)
    assert round(v3.total_params / 1e9) == 671 and round(v3.active_params / 1e9, 1) == 37.6
    assert v3.kv_bytes_per_token == 61 * (512 + 64) * 2  # the compressed latent: ~70 KB per token
    assert not v3.fits and "use more workers" in v3.reasons[0]
    assert sizing_from_config(str(DOCS / "DeepSeek-V3.json"), workers=24).fits
    fp32 = sizing_from_config(str(DOCS / "Qwen3-30B-A3B.json"), dtype="float32", workers=4)
    bf16 = sizing_from_config(str(DOCS / "Qwen3-30B-A3B.json"), workers=4)
    assert fp32.worker_expert_bytes == 2 * bf16.worker_expert_bytes and fp32.kv_tokens < bf16.kv_tokens
    assert sizing_from_config(str(DOCS / "Qwen3-30B-A3B.json"), workers=0).fits  # 57 GiB in bf16 on one GPU
    alone = sizing_from_config(str(DOCS / "Qwen3-30B-A3B.json"), dtype="float32", workers=0)
    assert not alone.fits and "spread the experts over --workers" in alone.reasons[0]


def test_docs_configs_are_the_published_ones():
    for name in ("Mixtral-8x7B-Instruct-v0.1", "Qwen3-30B-A3B", "DeepSeek-V3"):
        assert json.loads((DOCS / f"{name}.json").read_text()) == PUBLISHED[name]


@pytest.mark.parametrize("text,expected", [("80GiB", 80 << 30), ("80G", 80 << 30), ("80GB", 80 * 10**9),
                                           ("1.5TiB", 3 << 39), ("1024", 1024)])
def test_sizes(text, expected):
    assert parse_bytes(text) == expected
    with pytest.raises(ValueError, match="--gpu-memory"):
        parse_bytes("lots")
