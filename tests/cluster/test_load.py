import torch

from cluster.engine import LLMEngine, SamplingParams
from cluster.expert_load import ExpertLoadTracker, max_over_mean
from cluster.model.moe import Routing


def test_counts_ema_and_coactivation():
    t = ExpertLoadTracker((0, 2), num_experts=4, alpha=0.5)
    r0 = Routing(0, torch.tensor([[0, 1], [0, 2], [0, 1]]), torch.ones(3, 2))
    r2 = Routing(2, torch.tensor([[3, 2], [3, 2], [3, 2]]), torch.ones(3, 2))
    t.record([r0, r2])
    assert t.total.tolist() == [[3, 2, 1, 0], [0, 0, 3, 3]]
    assert t.ema.tolist() == [[1.5, 1.0, 0.5, 0.0], [0.0, 0.0, 1.5, 1.5]]
    assert t.coactivation[0, 0, 1].item() == 2 and t.coactivation[0, 0, 2].item() == 1
    assert t.coactivation[0, 1, 2].item() == 0 and t.coactivation[1, 2, 3].item() == 3
    assert t.coactivation[0, 1, 0].item() == 2 and t.coactivation[0, 0, 0].item() == 0  # symmetric, no self-pairs
    t.record([r0, r2])
    assert t.ema[0, 0].item() == 2.25  # 0.5 * 1.5 + 0.5 * 3
    snap = t.snapshot()
    assert snap["steps"] == 2 and snap["max_over_mean"][1] == 2.0


def test_max_over_mean_of_idle_layer_is_one():
    assert max_over_mean(torch.zeros(1, 4)).tolist() == [1.0]


def test_engine_counts_every_routed_token(checkpoint_factory):
    engine = LLMEngine.from_pretrained(str(checkpoint_factory("qwen2_moe")), max_num_seqs=4)
    out = engine.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    cfg = engine.cfg
    per_layer = (5 + 2 * 3) * cfg.top_k  # prompts + 3 decode steps each, top-k rows per token
    assert engine.expert_load.total.sum(-1).tolist() == [per_layer] * len(cfg.moe_layer_ids)
    assert sum(o.expert_tokens for o in out) == per_layer * len(cfg.moe_layer_ids)
