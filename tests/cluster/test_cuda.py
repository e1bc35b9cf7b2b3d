"""GPU paths: the engine on `cuda` against the CPU engine; dtype auto, FP8 dequantised on the GPU,
the KV cache sized from the device's free memory. Skipped without CUDA."""
import pytest
import torch

from cluster.engine import LLMEngine, SamplingParams
from tests.helpers import our_greedy_logits
from tests.published_checkpoints import build

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PROMPT = [3, 14, 15, 92, 65, 35]


def _worst(a, b):
    return max((x - y.cpu()).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_cuda_matches_cpu(checkpoint_factory, family):
    torch.backends.cuda.matmul.allow_tf32 = False
    path = str(checkpoint_factory(family))
    cpu, gpu = LLMEngine.from_pretrained(path), LLMEngine.from_pretrained(path, device="cuda", dtype="float32")
    assert gpu.dtype == torch.float32  # asked for: auto would be bf16 for these fp32 checkpoints
    cpu_tokens, cpu_logits = our_greedy_logits(cpu, PROMPT, 16)
    gpu_tokens, gpu_logits = our_greedy_logits(gpu, PROMPT, 16)
    assert gpu_tokens == cpu_tokens and _worst(cpu_logits, gpu_logits) < 1e-4
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    assert gpu.generate([PROMPT, PROMPT[:2]], params)[0].token_ids == cpu_tokens


def test_fp8_checkpoint_dequantised_on_the_gpu(tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = False
    ours, _ = build("DeepSeek-V3", tmp_path)
    cpu = LLMEngine.from_pretrained(str(ours), dtype="float32", max_model_len=128)
    gpu = LLMEngine.from_pretrained(str(ours), device="cuda", dtype="float32", max_model_len=128,
                                    kv_cache_memory_bytes=64 << 20)
    assert gpu.model.weights.layers[0].attn.q_b.is_cuda
    cpu_tokens, cpu_logits = our_greedy_logits(cpu, PROMPT, 16)
    gpu_tokens, gpu_logits = our_greedy_logits(gpu, PROMPT, 16)
    assert gpu_tokens == cpu_tokens and _worst(cpu_logits, gpu_logits) < 1e-4


def test_latent_moe_on_the_gpu_matches_cpu(tmp_path):
    """Nemotron 3 Super's latent MoE on `cuda` (the projections, latent-wide grouped experts, Mamba-2 chunks over a
    prompt crossing three of 32): greedy tokens and logits as on the CPU."""
    torch.backends.cuda.matmul.allow_tf32 = False
    ours, _ = build("NVIDIA-Nemotron-3-Super-120B-A12B-BF16", tmp_path)
    prompt = [(7 * i + 3) % 250 + 1 for i in range(80)]
    cpu = LLMEngine.from_pretrained(str(ours), dtype="float32", max_model_len=128)
    gpu = LLMEngine.from_pretrained(str(ours), device="cuda", dtype="float32", max_model_len=128,
                                    kv_cache_memory_bytes=64 << 20)
    assert gpu.model.weights.layers[gpu.cfg.moe_layer_ids[0]].latent_in.is_cuda and gpu.cfg.expert_row_size == 16
    cpu_tokens, cpu_logits = our_greedy_logits(cpu, prompt, 8)
    gpu_tokens, gpu_logits = our_greedy_logits(gpu, prompt, 8)
    assert gpu_tokens == cpu_tokens and _worst(cpu_logits, gpu_logits) < 1e-4


def test_auto_dtype_on_gpu_is_bf16_for_an_fp32_checkpoint(checkpoint_factory):
    engine = LLMEngine.from_pretrained(str(checkpoint_factory("qwen3_moe")), device="cuda", max_model_len=64,
                                       kv_cache_memory_bytes=16 << 20)
    assert engine.cfg.checkpoint_dtype == torch.float32 and engine.dtype == torch.bfloat16


def test_auto_dtype_on_gpu_is_the_checkpoints_bf16(tmp_path):
    ours, _ = build("Qwen3-30B-A3B", tmp_path)
    gpu = LLMEngine.from_pretrained(str(ours), device="cuda", max_model_len=128, gpu_memory_utilization=0.05)
    cpu = LLMEngine.from_pretrained(str(ours), max_model_len=128)
    assert gpu.dtype == gpu.kv_dtype == torch.bfloat16 and cpu.dtype == torch.float32
    assert gpu.memory["weights_bytes"] * 2 == cpu.memory["weights_bytes"]
    free, total = torch.cuda.mem_get_info()
    assert 0 < gpu.cache.nbytes <= 0.05 * total  # the cache took what 5% of the device left it
    _, cpu_logits = our_greedy_logits(cpu, PROMPT, 8)
    _, gpu_logits = our_greedy_logits(gpu, PROMPT, 8)
    scale = max(x.abs().max().item() for x in cpu_logits)
    assert _worst(cpu_logits, gpu_logits) < 0.05 * scale  # bf16 weights and compute


def test_grouped_experts_on_cuda_equal_the_loop():
    """bf16 experts on the GPU run as grouped matmuls (no host counts), including experts with no
    rows and every row to one expert."""
    from cluster.model.experts import LocalExperts, swiglu
    from cluster.model.weights import MLPWeights

    g = torch.Generator().manual_seed(0)
    experts = {(0, e): MLPWeights((torch.randn(64, 32, generator=g) * 0.2).bfloat16().cuda(),
                                  (torch.randn(32, 32, generator=g) * 0.2).bfloat16().cuda()) for e in range(8)}
    local = LocalExperts(experts)
    assert local.grouped == (torch.cuda.get_device_capability()[0] in (9, 10)), local.loop_reason  # else the loop
    rows = torch.randn(24, 32, generator=g).bfloat16().cuda()
    for counts in ([3, 0, 5, 0, 0, 8, 8, 0], [0, 0, 24, 0, 0, 0, 0, 0], [24, 0, 0, 0, 0, 0, 0, 0]):
        got, start = local.run(0, rows, counts), 0
        assert got.shape == rows.shape
        for e, n in enumerate(counts):
            if n:  # an expert with no rows owns no output rows; max() of an empty tensor raises
                want = swiglu(rows[start:start + n], experts[(0, e)])
                assert (got[start:start + n].float() - want.float()).abs().max() < 0.05 * want.float().abs().max() + 1e-3
            start += n


def test_decode_steps_from_cuda_graphs_equal_eager_steps(checkpoint_factory):
    """Teacher-forced: the same decode batches (3 sequences of different lengths, so the batch and context
    buckets pad) through the eager forward and through captured graphs, each with its own KV cache."""
    from cluster.model.batch import make_batch
    from cluster.model.cuda_graphs import DecodeGraphs
    from cluster.model.kv_cache import KVCache

    engine = LLMEngine.from_pretrained(str(checkpoint_factory("qwen3_moe")), device="cuda", dtype="bfloat16",
                                       max_model_len=128, kv_cache_memory_bytes=16 << 20)
    assert engine.graphs is not None  # auto: grouped bf16 experts on the GPU
    model, caches = engine.model, [KVCache.for_model(engine.cfg, 32, 16, engine.kv_dtype, "cuda") for _ in range(2)]
    graphs = DecodeGraphs(model, caches[1])
    prompts = [[5, 17, 33, 2], list(range(3, 40, 2)), [7]]
    tables = [list(range(4 * i, 4 * i + 4)) for i in range(len(prompts))]  # the same blocks in both caches
    for cache in caches:
        model.forward(make_batch([(t, p, 0) for t, p in zip(tables, prompts)], 16, "cuda"), cache)
    lengths, last = [len(p) for p in prompts], [p[-1] for p in prompts]
    for _ in range(12):
        batch = make_batch([(t, [tok], n) for t, tok, n in zip(tables, last, lengths)], 16, "cuda")
        eager, _ = model.forward(batch, caches[0])
        out = graphs.run(batch)
        assert out is not None, graphs.failed  # captured (or replayed), not the eager fallback
        replayed, routing = out
        scale = eager.abs().max().item()
        assert (eager - replayed).abs().max().item() < 0.03 * scale
        assert routing[0].ids.shape == (len(prompts), engine.cfg.top_k)
        last, lengths = eager.argmax(-1).tolist(), [n + 1 for n in lengths]
    assert graphs.replays == 12 and len(graphs.graphs) >= 1


def test_engine_with_cuda_graphs_generates_like_without(checkpoint_factory):
    path = str(checkpoint_factory("mixtral"))
    kw = dict(device="cuda", dtype="bfloat16", max_model_len=128, kv_cache_memory_bytes=16 << 20)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    with_graphs = LLMEngine.from_pretrained(path, cuda_graphs=True, **kw)
    without = LLMEngine.from_pretrained(path, cuda_graphs=False, **kw)
    a = with_graphs.generate([PROMPT, PROMPT[:2]], params)
    b = without.generate([PROMPT, PROMPT[:2]], params)
    assert with_graphs.graphs.replays >= 7 and without.graphs is None
    # the first token comes from the (eager) prefill, the second from a replayed graph; later ones may
    # differ in bf16 on near-ties (the padded shapes round differently): the teacher-forced test checks them
    assert [o.token_ids[:2] for o in a] == [o.token_ids[:2] for o in b]


def test_overlap_is_on_by_default_for_remote_experts_on_a_gpu_router(checkpoint_factory):
    """Auto: on for remote experts on a GPU (off on a CPU router, tests/cluster/test_overlap.py), same output."""
    from tests.cluster.helpers import Recorder

    path = str(checkpoint_factory("mixtral"))
    plain = LLMEngine.from_pretrained(path, device="cuda", dtype="float32", max_num_seqs=4, max_model_len=128,
                                      overlap=False)
    deferred = LLMEngine.from_pretrained(path, device="cuda", dtype="float32", max_num_seqs=4, max_model_len=128,
                                         experts=Recorder(plain.model.experts))
    assert deferred.model.overlap and not plain.model.overlap
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = [PROMPT, PROMPT[:2], PROMPT[1:]]
    assert [o.token_ids for o in deferred.generate(prompts, params)] == \
        [o.token_ids for o in plain.generate(prompts, params)]


def test_cuda_graph_grid_is_captured_at_start_up_and_nothing_mid_serving(checkpoint_factory):
    """Finding 14: every bucket up to max_num_seqs × max_model_len is captured when the engine is built;
    serving then only replays (no capture, with its synchronize and empty_cache, mid-stream)."""
    from cluster.model.cuda_graphs import bucket_grid

    path = str(checkpoint_factory("qwen3_moe"))
    kw = dict(device="cuda", dtype="bfloat16", max_num_seqs=4, max_model_len=64, kv_cache_memory_bytes=16 << 20)
    engine = LLMEngine.from_pretrained(path, **kw)
    graphs = engine.graphs
    assert graphs is not None and graphs.failed is None, graphs and graphs.failed
    assert set(graphs.graphs) == set(bucket_grid(4, 64))
    captured = {k: g.graph for k, g in graphs.graphs.items()}
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    out = engine.generate([PROMPT, PROMPT[:2], [7]], params)
    assert graphs.replays >= 7 and {k: g.graph for k, g in graphs.graphs.items()} == captured
    eager = LLMEngine.from_pretrained(path, cuda_graphs=False, **kw).generate([PROMPT, PROMPT[:2], [7]], params)
    assert [o.token_ids[:2] for o in out] == [o.token_ids[:2] for o in eager]
