"""The paged KV cache: sized from a byte budget, sequences admitted while blocks are free, the
newest preempted (and later recomputed) when decoding runs out, outputs unchanged; the memory
the engine reports at bf16 and fp32."""
import logging
import re

import pytest
import torch

from cluster.engine import InvalidRequest, LLMEngine, SamplingParams
from cluster.engine.memory import CPU_KV_CAP_BYTES
from cluster.model.kv_cache import KVCache, kv_bytes_per_token

PROMPTS = [[(5 * i + j) % 120 + 1 for j in range(n)] for i, n in enumerate([9, 3, 14, 6, 11])]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])  # plain and latent (MLA) caches
def test_preemption_under_a_tiny_budget_gives_the_same_outputs(checkpoint_factory, family):
    path = str(checkpoint_factory(family))
    roomy = LLMEngine.from_pretrained(path, max_num_seqs=8, max_model_len=64, block_size=4)
    expected = [o.token_ids for o in roomy.generate(PROMPTS, GREEDY)]
    per_block = roomy.cache.bytes_per_token * 4
    tight = LLMEngine.from_pretrained(path, max_num_seqs=8, max_model_len=64, block_size=4,
                                      kv_cache_memory_bytes=10 * per_block)  # 40 tokens for 5 x ~22
    assert tight.cache.num_blocks == 10
    outs = tight.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == expected
    assert tight.scheduler.num_preemptions > 0 and roomy.scheduler.num_preemptions == 0
    assert tight.cache.num_free_blocks == 10 and tight.free_seq_slots == 8
    print(f"{family}: {tight.scheduler.num_preemptions} preemptions in 10 blocks of 4 tokens, outputs unchanged")


def test_sequences_wait_for_free_blocks(checkpoint_factory):
    path = str(checkpoint_factory("mixtral"))
    with pytest.raises(ValueError, match="a budget of 0 bytes does not hold one block"):
        LLMEngine.from_pretrained(path, max_num_seqs=8, max_model_len=64, block_size=4, kv_cache_memory_bytes=0)
    one_block = kv_bytes_per_token(LLMEngine.from_pretrained(path).cfg, torch.float32) * 4
    engine = LLMEngine.from_pretrained(path, max_num_seqs=8, max_model_len=64, block_size=4,
                                       kv_cache_memory_bytes=one_block)
    assert engine.cache.num_blocks == 1
    with pytest.raises(InvalidRequest, match=r"exceeds the KV cache \(4 tokens\)") as e:
        engine.add_request([1, 2, 3], SamplingParams(max_tokens=2))
    assert e.value.param == "max_tokens"
    engine.add_request([1, 2], SamplingParams(max_tokens=2, temperature=0))
    engine.add_request([3, 4], SamplingParams(max_tokens=2, temperature=0))
    assert [len(engine.scheduler.schedule())] == [1]  # the second waits: no block left for it


def test_budget_sizes_the_pool(checkpoint_factory):
    path = str(checkpoint_factory("qwen3_moe"))
    engine = LLMEngine.from_pretrained(path, max_num_seqs=4, max_model_len=128)
    per_token = kv_bytes_per_token(engine.cfg, torch.float32)
    assert engine.cache.bytes_per_token == per_token
    assert engine.cache.nbytes == 4 * 128 * per_token < CPU_KV_CAP_BYTES  # CPU default: max_num_seqs x max_model_len
    sized = LLMEngine.from_pretrained(path, max_num_seqs=64, max_model_len=128, kv_cache_memory_bytes=100 * per_token * 16)
    assert sized.cache.capacity_tokens == 1600 and sized.cache.nbytes == 1600 * per_token
    cache = KVCache.for_budget(sized.cfg, 100 * per_token * 16 + 5, block_size=16)
    assert cache.num_blocks == 100


def test_memory_report_at_bf16_and_fp32(checkpoint_factory, caplog):
    path = str(checkpoint_factory("deepseek_v3"))
    with caplog.at_level(logging.INFO, logger="cluster.engine"):
        fp32 = LLMEngine.from_pretrained(path, max_num_seqs=2, max_model_len=64)
    bf16 = LLMEngine.from_pretrained(path, dtype="bfloat16", max_num_seqs=2, max_model_len=64)
    mixed = LLMEngine.from_pretrained(path, dtype="bfloat16", kv_cache_dtype="float32", max_num_seqs=2,
                                      max_model_len=64)
    assert fp32.memory["dtype"] == "float32" and bf16.memory["dtype"] == "bfloat16"
    # the gate (and DeepSeek's selection bias) stay fp32 at bf16, as transformers keeps them
    fp32_kept = len(fp32.cfg.moe_layer_ids) * (fp32.cfg.num_experts * fp32.cfg.hidden_size + fp32.cfg.num_experts)
    assert bf16.memory["weights_bytes"] == fp32.memory["weights_bytes"] // 2 + fp32_kept * 2
    assert bf16.memory["kv_bytes_per_token"] * 2 == fp32.memory["kv_bytes_per_token"]
    assert mixed.memory["kv_cache_dtype"] == "float32" and mixed.cache.k.dtype == torch.float32
    expert_params = sum(w.gate_up.numel() + w.down.numel() for w in fp32.model.experts.experts.values())
    assert fp32.memory["local_expert_bytes"] == expert_params * 4
    assert fp32.memory["local_expert_bytes"] == len(fp32.cfg.experts()) * fp32.cfg.expert_bytes(torch.float32)
    assert any("KV cache" in r.message and "weights" in r.message for r in caplog.records)
    print({k: (fp32.memory[k], bf16.memory[k]) for k in ("weights_bytes", "kv_bytes_per_token")})
    layer = next(w for w in bf16.model.weights.layers if w.gate is not None)
    assert layer.gate.dtype == torch.float32 and layer.attn.q_b.dtype == torch.bfloat16


def test_prompt_logprobs_survive_a_preemption_unchanged(checkpoint_factory):
    path = str(checkpoint_factory("mixtral"))
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, prompt_logprobs=2)
    roomy = LLMEngine.from_pretrained(path, max_num_seqs=8, max_model_len=64, block_size=4)
    expected = roomy.generate(PROMPTS, params)
    tight = LLMEngine.from_pretrained(path, max_num_seqs=8, max_model_len=64, block_size=4,
                                      kv_cache_memory_bytes=10 * roomy.cache.bytes_per_token * 4)
    ids = [tight.add_request(p, params) for p in PROMPTS]
    scored = {rid: 0 for rid in ids}
    outs = {rid: [] for rid in ids}
    while tight.has_unfinished():
        for o in tight.step():
            scored[o.request_id] += o.prompt_logprobs is not None
            outs[o.request_id].append(o.token_id)
    assert tight.scheduler.num_preemptions > 0
    assert all(n == 1 for n in scored.values())  # once, on the first output, not again after a recompute
    assert [outs[rid] for rid in ids] == [c.token_ids for c in expected]


class FakeGpu:
    """torch.cuda's memory queries for a 141 GB device (the review's H200), without CUDA: `allocated`
    bytes in tensors, `reserved` held by the caching allocator (mem_get_info counts both as used)."""
    total = 141 * 10**9

    def __init__(self, monkeypatch, allocated: int, reserved: int):
        self.allocated, self.reserved = allocated, reserved
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (self.total - self.reserved, self.total))
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev=None: self.reserved)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev=None: self.allocated)


def test_gpu_budget_is_what_the_engine_needs_and_leaves_room_for_a_second_engine(monkeypatch):
    from cluster.loader import open_model
    from cluster.engine.memory import kv_cache_budget

    _, _, cfg = open_model("models/demo")
    per_token = kv_bytes_per_token(cfg, torch.bfloat16)
    gpu = FakeGpu(monkeypatch, allocated=2 << 30, reserved=2 << 30)  # weights of the first engine
    first = kv_cache_budget(cfg, torch.bfloat16, "cuda", 8, 128, None, 0.9)
    assert first == 8 * 128 * per_token  # not ~90% of the device (126 GiB before)
    gpu.allocated += first  # the first engine's cache, and a freed third engine's 40 GB still cached:
    gpu.reserved += first + 40 * 10**9
    second = kv_cache_budget(cfg, torch.bfloat16, "cuda:0", 64, 2048, None, 0.9)
    assert second == 64 * 2048 * per_token  # the cached bytes count as free (was 0 → ValueError)
    gpu.allocated = gpu.reserved = int(0.9 * gpu.total) - 1000  # truly full: a clear refusal, no OOM later
    with pytest.raises(ValueError, match="gpu_memory_utilization=0.9, less than one sequence of max_model_len=2048"):
        kv_cache_budget(cfg, torch.bfloat16, "cuda", 64, 2048, None, 0.9)
    assert kv_cache_budget(cfg, torch.bfloat16, "cuda", 64, 2048, 12345, 0.9) == 12345  # explicit bytes win


@pytest.mark.parametrize("name", ["demo", "Qwen3-Next-80B-A3B-Instruct"])  # plain, and hybrid (state slots first)
def test_an_explicit_budget_short_of_one_full_sequence_is_refused_with_the_bytes_that_would_do(name):
    from cluster.engine.memory import full_length_refusal
    from cluster.families import resolve
    from cluster.loader import open_model
    from tests.published_configs import tiny

    if name == "demo":
        cfg = open_model("models/demo")[2]
    else:
        family, text = resolve(tiny(name))
        cfg = family.parse_config(text)
    seqs, length = 4, 100  # not a whole number of 16-token blocks: the last block is counted whole
    reason = full_length_refusal(cfg, torch.float32, 1000, length, 16, seqs)
    need = int(re.search(r"at least (\d+)", reason).group(1))
    assert full_length_refusal(cfg, torch.float32, need, length, 16, seqs) is None
    assert KVCache.for_budget(cfg, need, 16, torch.float32, max_num_seqs=seqs).capacity_tokens >= length
    short = full_length_refusal(cfg, torch.float32, need - 1, length, 16, seqs)
    assert short and "lower max_model_len to at most 96" in short
    assert KVCache.for_budget(cfg, need - 1, 16, torch.float32, max_num_seqs=seqs).capacity_tokens == 96
