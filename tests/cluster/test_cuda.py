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
    cpu, gpu = LLMEngine.from_pretrained(path), LLMEngine.from_pretrained(path, device="cuda")
    assert gpu.dtype == torch.float32  # auto = the checkpoint's dtype: these tiny ones are saved fp32
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
