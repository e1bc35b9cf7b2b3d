"""Hybrid models (linear-attention layers with per-sequence recurrent state, Qwen3-Next): the state
cache's slots, the scheduler admitting by blocks and slots, the chunked and recurrent forms of the
delta rule agreeing, preemption and chunked prefill keeping outputs, and what is refused."""
import json

import pytest
import torch

from cluster.engine import LLMEngine, SamplingParams
from cluster.engine.scheduler import Scheduler
from cluster.engine.sequence import Sequence
from cluster.families import resolve
from cluster.model.deltanet import chunked_delta_rule, recurrent_step
from cluster.model.kv_cache import KVCache, kv_bytes_per_token
from cluster.model.state_cache import state_bytes_per_seq
from cluster.sizing import format_sizing as format_plan, sizing_from_config as plan_from_config
from tests.cluster.helpers import preempted_and_chunked_equal_roomy
from tests.published_checkpoints import build
from tests.published_configs import PUBLISHED, tiny

NAME = "Qwen3-Next-80B-A3B-Instruct"


def _cfg(name: str = NAME, released: bool = False):
    family, text = resolve(PUBLISHED[name] if released else tiny(name))
    return family.parse_config(text)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    ours, _ = build(NAME, tmp_path_factory.mktemp("qwen3_next"))
    return ours


def test_layer_pattern_and_cache_rows_follow_the_config():
    cfg = _cfg()
    assert cfg.linear_layers == (True, True, True, False) and cfg.attention_layer_ids == (3,)
    cache = KVCache.for_model(cfg, num_blocks=4, block_size=4, num_state_slots=3)
    assert cache.k.shape[0] == 1  # keys and values for the one attention layer only
    assert cache.states.recurrent.shape == (3, 3, 4, 16, 16)  # [linear layers, slots, Hv, dk, dv]
    assert cache.states.conv.shape == (3, 3, 2 * 2 * 16 + 4 * 16, 3)  # q, k, v channels; K - 1 inputs
    assert cache.nbytes == cache.k.nbytes + cache.v.nbytes + 3 * state_bytes_per_seq(cfg, torch.float32)


@pytest.mark.parametrize("budget_seqs,max_num_seqs,slots", [(3, 2, 2), (3, 8, 3), (1, 8, 1)])
def test_budget_gives_state_slots_then_blocks(budget_seqs, max_num_seqs, slots):
    cfg = _cfg()
    per_block, per_seq = kv_bytes_per_token(cfg, torch.float32) * 4, state_bytes_per_seq(cfg, torch.float32)
    budget = budget_seqs * (per_seq + per_block) + 5 * per_block
    cache = KVCache.for_budget(cfg, budget, block_size=4, max_num_seqs=max_num_seqs)
    assert cache.states.num_slots == slots
    assert cache.num_blocks == (budget - slots * per_seq) // per_block
    with pytest.raises(ValueError, match="recurrent state"):
        KVCache.for_budget(cfg, per_seq, block_size=4)


def test_scheduler_admits_by_blocks_and_state_slots():
    cache = KVCache.for_model(_cfg(), num_blocks=64, block_size=4, num_state_slots=2)
    scheduler = Scheduler(cache, max_num_seqs=4, max_num_batched_tokens=64)
    seqs = [Sequence(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=4)) for i in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    assert scheduler.free_seq_slots == 2  # the state slots, not max_num_seqs, bound what may join
    assert scheduler.schedule() == seqs[:2]  # the third waits for a slot, not for blocks
    assert scheduler.free_seq_slots == 0
    assert sorted(s.state_slot for s in seqs[:2]) == [0, 1] and cache.states.num_free == 0
    scheduler.finish(seqs[0])
    assert seqs[0].state_slot is None and cache.states.num_free == 1
    assert seqs[2] in scheduler.schedule() and seqs[2].state_slot is not None


def test_chunked_form_equals_the_recurrence():
    """transformers' chunked algorithm (prefill) against the one-token recurrence (decode), also across a
    split: the state a first piece leaves is where the second starts."""
    torch.manual_seed(0)
    n, hk, hv, dk, dv = 80, 2, 4, 8, 6
    q, k = torch.randn(n, hk, dk), torch.randn(n, hk, dk)
    v, beta = torch.randn(n, hv, dv), torch.rand(n, hv)
    g = -torch.rand(n, hv)
    state0 = torch.randn(hv, dk, dv) * 0.1
    whole, s_whole = chunked_delta_rule(q, k, v, g, beta, state0)
    s, outs = state0[None], []
    for t in range(n):
        o, s = recurrent_step(q[t:t + 1], k[t:t + 1], v[t:t + 1], g[t:t + 1], beta[t:t + 1], s)
        outs.append(o[0])
    torch.testing.assert_close(whole, torch.stack(outs), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s_whole, s[0], atol=1e-4, rtol=1e-4)
    first, s_first = chunked_delta_rule(q[:50], k[:50], v[:50], g[:50], beta[:50], state0)
    second, s_second = chunked_delta_rule(q[50:], k[50:], v[50:], g[50:], beta[50:], s_first)
    torch.testing.assert_close(torch.cat([first, second]), whole, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s_second, s_whole, atol=1e-4, rtol=1e-4)


def test_preemption_and_chunked_prefill_keep_outputs(checkpoint):
    """A budget of 3 state slots and 8 blocks of 4 tokens for 4 requests of up to 26 tokens: sequences are
    preempted (their state freed) and recomputed, prompts prefilled 8 tokens a step beside running decodes,
    each step run as two micro-batches (the overlap's split carries the state slots); greedy and seeded
    outputs equal one roomy engine's whole-prompt ones. A one-token prompt starts from a decode step."""
    preempted_and_chunked_equal_roomy(str(checkpoint))


def test_bf16_follows_fp32(checkpoint):
    """Served in bf16 (activations and conv state bf16, recurrent state fp32), the logits stay within bf16's
    rounding of the fp32 ones over a prompt crossing a delta-rule chunk."""
    from tests.helpers import our_greedy_logits

    prompt = [(7 * i + 3) % 250 + 1 for i in range(80)]
    fp32 = LLMEngine.from_pretrained(str(checkpoint), dtype="float32", max_model_len=128)
    bf16 = LLMEngine.from_pretrained(str(checkpoint), dtype="bfloat16", max_model_len=128)
    assert bf16.cache.states.conv.dtype == torch.bfloat16 and bf16.cache.states.recurrent.dtype == torch.float32
    _, want = our_greedy_logits(fp32, prompt, 1)
    _, got = our_greedy_logits(bf16, prompt, 1)
    assert (got[0].float() - want[0]).abs().max() < 0.05 < want[0].abs().max()


def test_prefix_caching_and_cuda_graphs_are_off_with_the_reason(checkpoint, caplog):
    from cluster.model.cuda_graphs import unsupported

    with caplog.at_level("INFO", logger="cluster.engine"):
        engine = LLMEngine.from_pretrained(str(checkpoint), dtype="float32", max_model_len=64)
    assert engine.scheduler.prefix_caching is None
    assert "prefix caching is off for qwen3_next" in caplog.text and "recurrent state" in caplog.text
    assert engine.memory["state_slots"] > 0 and engine.memory["state_bytes_per_seq"] > 0
    assert unsupported(engine.model) is not None  # this engine is on the CPU: no graphs, whatever the reason
    if torch.cuda.is_available():  # on the GPU in bf16 (grouped experts on Hopper/Blackwell) the state is the reason
        gpu = LLMEngine.from_pretrained(str(checkpoint), device="cuda", dtype="bfloat16", max_model_len=64)
        assert gpu.graphs is None
        reason = unsupported(gpu.model)
        assert ("recurrent state" if gpu.model.experts.grouped else "not grouped") in reason, reason


@pytest.mark.parametrize("changes,field", [
    ({"layer_types": ["linear_attention", "sliding_attention", "linear_attention", "full_attention"]}, "layer_types"),
    ({"layer_types": ["linear_attention", "full_attention"]}, "layer_types"),
    ({"linear_num_value_heads": 3}, "linear_num_value_heads"),
    ({"linear_conv_kernel_dim": 1}, "linear_conv_kernel_dim"),
    ({"attention_bias": True}, "attention_bias"),
])
def test_refusals_name_the_field(changes, field):
    from cluster.errors import UnsupportedModelError
    from cluster.families import get_family

    with pytest.raises(UnsupportedModelError, match=field):
        get_family("qwen3_next").parse_config({**tiny(NAME), **changes})


def test_plan_counts_the_recurrent_state(tmp_path):
    """Qwen3-Next-80B-A3B as released: 80 B parameters, 3.9 B active with the embeddings and LM head (3.25 B
    without: the "A3B"); each sequence's state over its 36
    DeltaNet layers is what the planner sets aside before KV blocks."""
    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED[NAME]))
    p = plan_from_config(str(tmp_path), workers=8, max_num_seqs=16, max_model_len=32768)
    cfg = _cfg(released=True)
    assert 79e9 < p.total_params < 82e9 and 3.8e9 < p.active_params < 3.95e9
    # 36 layers x (conv 8192 channels x 3 x 2 bytes + state 32 x 128 x 128 x 4 bytes)
    assert p.state_bytes_per_seq == state_bytes_per_seq(cfg, torch.bfloat16) == 36 * (8192 * 3 * 2 + 32 * 128 * 128 * 4)
    assert p.kv_bytes_per_token == 12 * 2 * 2 * 256 * 2  # 12 attention layers, 2 kv heads of 256, k and v, bf16
    assert "recurrent state" in format_plan(p)
