"""`moe-cluster plan --gpus 2 --gpu-memory 24GiB --host-memory 256GiB [--profile]` (issue 23): what fits in
which tier, on three published configs (config.json as released, no weights)."""
import json

import numpy as np
import pytest
import torch

from cluster.sizing import GiB, backbone_bytes, model_config
from cluster.profile import save_profile
from deployments.cli import main
from tests.published_configs import PUBLISHED

ARGS = ["--gpus", "2", "--gpu-memory", "24GiB", "--host-memory", "256GiB", "--json"]


def _plan(tmp_path, capsys, name: str, *extra: str) -> dict:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(PUBLISHED[name]))
    assert main(["plan", "--model", str(path), *ARGS, *extra]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name,per_expert,experts,fits,host_keeps_all", [
    ("Mixtral-8x7B-Instruct-v0.1", 3 * 4096 * 14336 * 2, 32 * 8, True, True),
    ("Qwen3-30B-A3B", 3 * 2048 * 768 * 2, 48 * 128, True, True),
    ("DeepSeek-V3", 3 * 7168 * 2048 * 2, 58 * 256, False, False),  # dequantised to bf16: 1.2 TiB of experts
])
def test_what_fits_in_which_tier(tmp_path, capsys, name, per_expert, experts, fits, host_keeps_all):
    p = _plan(tmp_path, capsys, name)
    cfg = model_config(str(tmp_path))
    usable = int(24 * GiB * 0.9)
    router, kv = backbone_bytes(cfg, torch.bfloat16), p["kv_bytes"]
    fast = min(experts, max(0, usable - router - kv) // per_expert + usable // per_expert)
    assert (p["expert_bytes"], p["routed_expert_count"], p["router_weight_bytes"]) == (per_expert, experts, router)
    assert p["fast_experts"] == fast and sum(p["fast_experts_per_layer"]) == fast
    assert max(p["fast_experts_per_layer"]) - min(p["fast_experts_per_layer"]) <= 1  # no profile: uniform
    assert p["expected_fast_row_share"] == pytest.approx(fast / experts)
    assert p["host_keeps_every_expert"] == host_keeps_all and p["fits"] == fits
    assert p["host_tier_bytes"] == min(experts, int(256 * GiB * 0.9) // per_expert) * per_expert
    if not fits:  # the router alone is 32 GiB, the experts 1.2 TiB: both named
        assert "router's weights" in p["reasons"][0] and "raise --host-memory" in p["reasons"][1]


def test_a_profile_puts_the_fast_tier_on_the_hot_experts(tmp_path, capsys):
    loads = np.ones((32, 8))
    loads[:, 3] = 10.0  # one hot expert per layer: 10 of 17 rows
    save_profile(tmp_path / "p.json", loads, list(range(32)))
    p = _plan(tmp_path, capsys, "Mixtral-8x7B-Instruct-v0.1", "--profile", str(tmp_path / "p.json"))
    fast = p["fast_experts"]
    hot = min(32, fast)  # the hot experts first, then equal ones spread over the layers
    assert p["expected_fast_row_share"] == pytest.approx((hot * 10 + (fast - hot)) / (32 * 17))
    assert p["from_profile"] and p["expected_fast_row_share"] > p["fast_byte_share"]


def test_text_and_refusals(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED["Qwen3-30B-A3B"]))
    assert main(["plan", "--model", str(tmp_path), "--gpus", "2", "--gpu-memory", "24GiB"]) == 0
    out = capsys.readouterr().out
    assert "per layer" in out and "host tier: 54.00 GiB (every expert" in out and "fits: yes" in out
    assert main(["plan", "--model", str(tmp_path), "--gpus", "2", "--host-memory", "lots"]) == 2
    assert "--host-memory: cannot read 'lots'" in capsys.readouterr().err
    save_profile(tmp_path / "p.json", np.ones((2, 8)), [0, 1])
    assert main(["plan", "--model", str(tmp_path), "--profile", str(tmp_path / "p.json")]) == 2
    assert ("--profile: the profile covers 2 MoE layers [0, 1] × 8 experts; this model has 48 MoE layers "
            "[0, 1, …, 47] × 128 experts") in capsys.readouterr().err  # the counts: a cut-off list hid them
