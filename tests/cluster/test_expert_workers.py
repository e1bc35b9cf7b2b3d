"""New expert kinds (fused [E, ...] tensors, biases, clamped SwiGLU, FP8 / MXFP4 / INT4 storage, a wrapper's
prefixes) behind the ExpertExecutor seam: workers that load only their own experts with load_experts and run
LocalExperts.run_subset, as remote expert workers do, give the in-process engine's output."""
import pytest
import torch

from cluster.engine import LLMEngine, SamplingParams
from cluster.loader import load_experts, open_model
from cluster.model.experts import LocalExperts
from tests.cluster.helpers import Workers
from tests.helpers import our_greedy_logits
from tests.published_checkpoints import build

PROMPT = [5, 17, 33, 2, 90, 41, 7]


@pytest.mark.parametrize("name", ["gpt-oss-20b", "granite-3.1-3b-a800m-instruct", "Phi-3.5-MoE-instruct",
                                  "DeepSeek-V3", "Kimi-K2.5", "DeepSeek-V3.2"])
def test_workers_loading_their_own_experts_give_the_same_output(name, tmp_path):
    ours, _ = build(name, tmp_path)
    local = LLMEngine.from_pretrained(str(ours), max_model_len=64)
    ckpt, family, cfg = open_model(str(ours))
    pairs = cfg.experts()
    load_experts(ckpt, family, cfg, pairs)
    all_expert_bytes = ckpt.bytes_read
    workers = []
    for half in (pairs[0::2], pairs[1::2]):
        worker_ckpt, _, _ = open_model(str(ours))
        workers.append(LocalExperts(load_experts(worker_ckpt, family, cfg, half)))
        assert worker_ckpt.bytes_read == all_expert_bytes // 2  # its experts' bytes (rows of fused tensors), no more
    split = LLMEngine.from_pretrained(str(ours), experts=Workers(workers), max_model_len=64)
    tokens, logits = our_greedy_logits(local, PROMPT, 12)
    split_tokens, split_logits = our_greedy_logits(split, PROMPT, 12)
    assert split_tokens == tokens
    assert max((a - b).abs().max().item() for a, b in zip(logits, split_logits)) < 1e-5
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    assert split.generate([PROMPT], params)[0].token_ids == tokens[:8]


def test_worker_in_another_dtype_takes_rows_in_the_callers(tmp_path):
    """A bf16 worker serving an fp32 router: rows are cast in and out (tensors cross in the serving dtype)."""
    ours, _ = build("gpt-oss-20b", tmp_path)
    ckpt, family, cfg = open_model(str(ours))
    pairs = cfg.experts()[:2]
    fp32 = LocalExperts(load_experts(ckpt, family, cfg, pairs))
    bf16 = LocalExperts(load_experts(ckpt, family, cfg, pairs, dtype="bfloat16"))
    assert bf16.experts[pairs[0]].gate_up.dtype == torch.bfloat16
    rows = torch.randn(6, cfg.hidden_size)
    layer = pairs[0][0]
    a = fp32.run_subset(layer, rows, [0, 1], [4, 2])
    b = bf16.run_subset(layer, rows, [0, 1], [4, 2])
    assert b.dtype == torch.float32 and (a - b).abs().max() < 0.05 * a.abs().max()
