"""GPU path: the engine on `cuda` gives the CPU engine's greedy tokens. Skipped without CUDA."""
import pytest
import torch

from cluster.engine import LLMEngine, SamplingParams
from tests.helpers import our_greedy_logits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_cuda_matches_cpu(checkpoint_factory, family):
    torch.backends.cuda.matmul.allow_tf32 = False
    path = str(checkpoint_factory(family))
    cpu, gpu = LLMEngine.from_pretrained(path), LLMEngine.from_pretrained(path, device="cuda")
    prompt = [3, 14, 15, 92, 65, 35]
    cpu_tokens, cpu_logits = our_greedy_logits(cpu, prompt, 16)
    gpu_tokens, gpu_logits = our_greedy_logits(gpu, prompt, 16)
    assert gpu_tokens == cpu_tokens
    assert max((a - b.cpu()).abs().max().item() for a, b in zip(cpu_logits, gpu_logits)) < 1e-4
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    assert gpu.generate([prompt, prompt[:2]], params)[0].token_ids == cpu_tokens
