"""Config features we do not implement are refused with an error naming the field, never ignored."""
import json
import shutil

import pytest
import torch

from cluster.engine import LLMEngine
from cluster.errors import UnsupportedModelError
from cluster.families import get_family
from cluster.precision import resolve_dtype, resolve_kv_dtype
from tests.published_configs import tiny


def _parse(name: str, **changes):
    cfg = {**tiny(name), **changes}
    return get_family(cfg["model_type"]).parse_config(cfg)


@pytest.mark.parametrize("name,changes,field", [
    ("DeepSeek-V3", {"quantization_config": {"quant_method": "awq", "bits": 4}}, "quantization_config.quant_method"),
    ("DeepSeek-V3", {"quantization_config": {"quant_method": "fp8", "activation_scheme": "static"}},
     "quantization_config.weight_block_size"),
    ("DeepSeek-V3", {"quantization_config": {"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}},
     "quantization_config.fmt"),
    ("DeepSeek-V3", {"topk_method": "group_limited_greedy"}, "topk_method"),
    ("DeepSeek-V3", {"scoring_func": "sqrtsoftplus"}, "scoring_func"),
    ("DeepSeek-V2-Lite-Chat", {"attention_bias": True}, "attention_bias"),
    ("Mixtral-8x7B-Instruct-v0.1", {"hidden_act": "gelu"}, "hidden_act"),
    ("Mixtral-8x7B-Instruct-v0.1", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ("Mixtral-8x7B-Instruct-v0.1", {"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
    ("Kimi-K2-Instruct", {"qk_layernorm": True}, "qk_layernorm"),
    ("Mixtral-8x7B-Instruct-v0.1", {"rope_scaling": {"rope_type": "su", "factor": 2.0}}, "rope_scaling.rope_type"),
    ("gpt-oss-20b", {"layer_types": ["sliding_attention", "chunked_attention"] * 2}, "layer_types"),
    ("gpt-oss-20b", {"layer_types": ["sliding_attention"]}, "layer_types"),
    ("Phi-3.5-MoE-instruct", {"num_experts_per_tok": 4}, "num_experts_per_tok"),
    ("Phi-3.5-MoE-instruct", {"rope_scaling": {**tiny("Phi-3.5-MoE-instruct")["rope_scaling"], "long_factor": [1.0]}},
     "short_factor and long_factor"),
    ("Qwen3-30B-A3B", {"rope_parameters": {"full_attention": {"rope_type": "default"}}},
     "rope_parameters per layer type"),
])
def test_unimplemented_config_fields_are_refused(name, changes, field):
    with pytest.raises(UnsupportedModelError, match=field.replace(".", r"\.")):
        _parse(name, **changes)


def test_refused_when_loading_a_checkpoint(checkpoint_factory, tmp_path):
    path = shutil.copytree(checkpoint_factory("mixtral"), tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(UnsupportedModelError, match="quant_method 'gptq' is not supported"):
        LLMEngine.from_pretrained(str(path))


@pytest.mark.parametrize("call,field", [
    (lambda: resolve_dtype("int8", "cpu", torch.bfloat16), "dtype: 'int8'"),
    (lambda: resolve_kv_dtype("fp8", torch.bfloat16), "kv_cache_dtype: 'fp8'"),
])
def test_bad_precision_settings_name_the_setting(call, field):
    with pytest.raises(ValueError, match=field):
        call()


def test_dtype_auto_is_the_checkpoints_on_gpu_and_fp32_on_cpu():
    assert resolve_dtype("auto", "cpu", torch.bfloat16) == torch.float32
    assert resolve_dtype("auto", "cuda", torch.bfloat16) == torch.bfloat16
    assert resolve_dtype("auto", "cuda:1", torch.float16) == torch.float16
    assert resolve_dtype("auto", "cuda", torch.float32) == torch.bfloat16  # vLLM's rule: fp32 checkpoints in bf16
    assert resolve_dtype(None, "cuda:0", torch.float32) == torch.bfloat16
    assert resolve_dtype("float32", "cuda", torch.float32) == torch.float32  # only when asked
    assert resolve_dtype("bfloat16", "cpu", torch.float32) == torch.bfloat16
    assert resolve_kv_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert resolve_kv_dtype("float32", torch.bfloat16) == torch.float32
