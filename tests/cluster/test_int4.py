"""compressed-tensors INT4 (pack-quantized, symmetric groups) as Kimi-K2-Thinking ships it:
dequantised like compressed-tensors itself, read per expert, and every other scheme refused by name."""
import copy

import pytest
import torch

from cluster.errors import UnsupportedModelError
from cluster.loader import load_experts, open_model
from cluster.quant import dequantize_int4, parse_quantization
from tests.published_checkpoints import build, quantize_int4
from tests.published_configs import KIMI_INT4


@pytest.mark.parametrize("shape, group", [((48, 64), 32), ((5, 96), 32), ((7, 40), 8)])
def test_int4_dequantises_as_compressed_tensors_unpacks(shape, group):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    torch.manual_seed(0)
    q, scale = quantize_int4(torch.randn(shape), group)
    packed = pack_to_int32(q, 4)
    expected = unpack_from_int32(packed, 4, torch.Size(shape)).float() * scale.float().repeat_interleave(group, -1)
    assert torch.equal(dequantize_int4(packed, scale, shape, torch.float32), expected)


def test_workers_read_only_their_experts_int4_bytes(tmp_path):
    ours, _ = build("Kimi-K2-Thinking", tmp_path)
    ckpt, family, cfg = open_model(str(ours))
    assert cfg.quantization.method == "int4" and cfg.quantization.group == 32
    layer = cfg.moe_layer_ids[0]
    mine = [n for n in ckpt.tensors if f"layers.{layer}.mlp.experts.5." in n]
    assert sorted({n.rsplit(".", 1)[1] for n in mine}) == ["weight_packed", "weight_scale", "weight_shape"]
    load_experts(ckpt, family, cfg, [(layer, 5)])
    assert ckpt.bytes_read == sum(ckpt.tensors[n].nbytes for n in mine)


def _with(path: str, value):
    q = copy.deepcopy(KIMI_INT4)
    *keys, last = path.split(".")
    node = q
    for key in keys:
        node = node[key]
    node[last] = value
    return {"quantization_config": q}


@pytest.mark.parametrize("path, value, named", [
    ("format", "int-quantized", "format"),
    ("config_groups.group_0.weights.symmetric", False, "symmetric"),
    ("config_groups.group_0.weights.num_bits", 8, "num_bits"),
    ("config_groups.group_0.weights.type", "float", "type"),
    ("config_groups.group_0.weights.strategy", "channel", "strategy"),
    ("config_groups.group_0.input_activations", {"num_bits": 8, "type": "float"}, "input_activations"),
])
def test_other_compressed_tensors_schemes_are_refused_by_name(path, value, named):
    assert parse_quantization({"quantization_config": KIMI_INT4}).method == "int4"
    with pytest.raises(UnsupportedModelError, match=named):
        parse_quantization(_with(path, value))
