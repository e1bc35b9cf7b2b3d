"""Attention without repeating K/V per query head, and the choice of attention backend."""
import pytest
import torch

from cluster.engine import LLMEngine, SamplingParams
from cluster.model import attention
from tests.helpers import our_greedy_logits, run_recording_logits
from tests.published_checkpoints import build

PROMPTS = [[5, 17, 33, 2], list(range(3, 40, 2)), [7]]
# gpt-oss slides a 128-token window on every other layer: a prompt past it, so the window masks something.
LONG_PROMPT = [(7 * i + 3) % 250 + 1 for i in range(150)]


# GQA with sinks and a sliding window; GQA with Llama 4's chunked attention (both mask prefill: n > 1 rows fold).
@pytest.mark.parametrize("name", ["gpt-oss-20b", "Llama-4-Scout-17B-16E"])
def test_folded_gqa_equals_attending_per_head(tmp_path, monkeypatch, name):
    """Query heads folded onto their kv head (K/V read once, never repeated) against each query head
    attending on its own: greedy tokens identical, fp32 logits equal to rounding, batched decode too."""
    ours, _ = build(name, tmp_path)
    engine = LLMEngine.from_pretrained(str(ours), dtype="float32", max_num_seqs=4, max_model_len=256)
    prompt = LONG_PROMPT if name.startswith("gpt-oss") else PROMPTS[1] * 2
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    folded, calls = attention._folded, []
    monkeypatch.setattr(attention, "_folded", lambda *a: calls.append(a[0].shape[2]) or folded(*a))
    runs = {}
    for fold in (False, True):  # the folded run last: `calls` keeps its query row counts
        monkeypatch.setattr(attention, "FOLD_GQA", fold)
        runs[fold] = our_greedy_logits(engine, prompt, 4), run_recording_logits(engine, PROMPTS, params)
        assert bool(calls) == fold
    (tokens, logits), (batched, batched_logits) = runs[True]
    (ref_tokens, ref_logits), (ref_batched, ref_batched_logits) = runs[False]
    assert tokens == ref_tokens and batched == ref_batched
    pairs = list(zip(logits, ref_logits)) + [p for xs, ys in zip(batched_logits, ref_batched_logits)
                                              for p in zip(xs, ys)]
    worst = max((a - b).abs().max().item() for a, b in pairs)
    print(f"{name}: folded vs per head, max |logit diff| {worst:.2e}; query rows folded: {sorted(set(calls))}")
    assert worst < 1e-4
    assert 1 in calls and any(n > 1 for n in calls)  # decode and masked prefill went through the folded path


@pytest.mark.parametrize("requested, device, kind, missing, chosen", [
    ("auto", "cpu", "mha", None, "sdpa"),
    ("auto", "cuda", "mha", None, "flashinfer"),
    ("auto", "cuda:1", "mha", None, "flashinfer"),
    ("auto", "cuda", "mha", "ImportError: No module named 'flashinfer'", "sdpa"),
    ("auto", "cuda", "mla", None, "sdpa"),
    ("sdpa", "cuda", "mha", None, "sdpa"),
    ("flashinfer", "cuda", "mha", None, "flashinfer"),
])
def test_backend_choice(requested, device, kind, missing, chosen):
    from cluster.model.attention_backend import choose_backend
    assert choose_backend(requested, device, kind, missing) == chosen


@pytest.mark.parametrize("device, kind, missing, says", [
    ("cpu", "mha", None, "need a CUDA device"),
    ("cuda", "mla", None, "multi-head latent attention"),
    ("cuda", "mha", "ImportError: No module named 'flashinfer'", r"not installed.*moe-cluster\[gpu\]"),
])
def test_flashinfer_refused_where_it_cannot_run(device, kind, missing, says):
    from cluster.model.attention_backend import choose_backend
    with pytest.raises(ValueError, match="attention_backend flashinfer: .*" + says):
        choose_backend("flashinfer", device, kind, missing)
    with pytest.raises(ValueError, match="attention_backend 'paged' is not one of auto, sdpa, flashinfer"):
        choose_backend("paged", device, kind, missing)


def test_flashinfer_import_is_what_decides(monkeypatch):
    """The import decides (stubbed here both ways): absent → the reason names the module; present → None."""
    import sys
    import types

    from cluster.model.attention_backend import choose_backend, flashinfer_missing
    monkeypatch.setitem(sys.modules, "flashinfer", None)  # import raises ImportError
    missing = flashinfer_missing()
    assert missing is not None and "flashinfer" in missing
    assert choose_backend("auto", "cuda", "mha", missing) == "sdpa"
    monkeypatch.setitem(sys.modules, "flashinfer", types.ModuleType("flashinfer"))
    assert flashinfer_missing() is None


@pytest.mark.parametrize("q, kv, head_dim, sinks, chunk, select, reason", [
    (torch.bfloat16, torch.bfloat16, 128, False, None, False, None),
    (torch.float16, torch.float16, 64, False, None, False, None),
    (torch.bfloat16, torch.bfloat16, 128, True, None, False, "sinks"),
    (torch.bfloat16, torch.bfloat16, 128, False, 8192, False, "chunked"),
    (torch.bfloat16, torch.bfloat16, 128, False, None, True, "sparse"),
    (torch.float32, torch.float32, 128, False, None, False, "fp16/bf16"),
    (torch.bfloat16, torch.float32, 128, False, None, False, "cache"),
    (torch.bfloat16, torch.bfloat16, 24, False, None, False, "head_dim 24"),
])
def test_what_flashinfer_attends(q, kv, head_dim, sinks, chunk, select, reason):
    from cluster.model.attention_backend import flashinfer_declines
    got = flashinfer_declines(q, kv, head_dim, sinks, chunk, select)
    assert got is None if reason is None else reason in got


def test_engine_refuses_flashinfer_on_a_cpu(checkpoint_factory):
    with pytest.raises(ValueError, match="attention_backend flashinfer: its kernels need a CUDA device"):
        LLMEngine.from_pretrained(str(checkpoint_factory("qwen3_moe")), max_model_len=64,
                                  attention_backend="flashinfer")
    engine = LLMEngine.from_pretrained(str(checkpoint_factory("qwen3_moe")), max_model_len=64)  # auto
    assert engine.model.paged_attention is None


def _reference_flashinfer():
    """FlashInfer's documented contract for the two wrappers we call, computed the plain way (this machine
    cannot install FlashInfer): NHD pages, a CSR page table, causal aligned to the end of the context,
    window_left keys left of the query, sm_scale 1/sqrt(hd) by default. It checks our page tables,
    windows and row bookkeeping, not FlashInfer's kernels (the CUDA test below does)."""
    import types

    class Paged:
        def __init__(self, workspace, kv_layout, use_tensor_cores=False):
            assert kv_layout == "NHD" and workspace.dtype == torch.uint8
            Paged.made += 1

        def _keep(self, qo, indptr, indices, last, hq, hk, page_size, window_left, sm_scale):
            assert indptr.dtype == indices.dtype == last.dtype == torch.int32
            assert hq % hk == 0 and 1 <= last.min() and last.max() <= page_size
            self.qo, self.indptr, self.indices, self.last = qo.tolist(), indptr.tolist(), indices.long(), last.tolist()
            self.group, self.page_size, self.window_left, self.scale = hq // hk, page_size, window_left, sm_scale

        def run(self, q, kv):
            outs = []
            for b, last in enumerate(self.last):
                pages = self.indices[self.indptr[b]:self.indptr[b + 1]]
                n_kv = (len(pages) - 1) * self.page_size + last
                k, v = (t[pages].flatten(0, 1)[:n_kv].repeat_interleave(self.group, 1).float() for t in kv)
                qb = q[self.qo[b]:self.qo[b + 1]].float()  # [n, H, hd]
                q_pos = n_kv - qb.shape[0] + torch.arange(qb.shape[0])
                seen = torch.arange(n_kv)[None, :] <= q_pos[:, None]
                if self.window_left >= 0:
                    seen &= torch.arange(n_kv)[None, :] >= q_pos[:, None] - self.window_left
                scale = qb.shape[-1] ** -0.5 if self.scale is None else self.scale
                scores = torch.einsum("nhd,khd->hnk", qb, k).mul(scale).masked_fill(~seen, float("-inf"))
                outs.append(torch.einsum("hnk,khd->nhd", scores.softmax(-1), v).to(q.dtype))
            return torch.cat(outs)

    Paged.made = 0

    class BatchDecodeWithPagedKVCacheWrapper(Paged):
        def plan(self, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size, *,
                 window_left=-1, sm_scale=None, q_data_type=None, kv_data_type=None):
            qo = torch.arange(len(last_page_len) + 1)
            self._keep(qo, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, page_size, window_left,
                       sm_scale)

    class BatchPrefillWithPagedKVCacheWrapper(Paged):
        def plan(self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads,
                 num_kv_heads, head_dim_qk, page_size, *, causal=False, window_left=-1, sm_scale=None,
                 q_data_type=None, kv_data_type=None):
            assert causal and qo_indptr.dtype == torch.int32
            self._keep(qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads,
                       num_kv_heads, page_size, window_left, sm_scale)

    module = types.ModuleType("flashinfer")
    module.Paged = Paged
    module.BatchDecodeWithPagedKVCacheWrapper = BatchDecodeWithPagedKVCacheWrapper
    module.BatchPrefillWithPagedKVCacheWrapper = BatchPrefillWithPagedKVCacheWrapper
    return module


@pytest.mark.parametrize("family, overrides", [("qwen3_moe", {}), ("mixtral", {"sliding_window": 6})])
def test_paged_backend_bookkeeping_equals_sdpa(checkpoint_factory, monkeypatch, family, overrides):
    """The FlashInfer backend's page tables, windows and rows, run through the reference contract above in
    fp32 (its dtype and head-dim rules are the table test's): chunked prefill beside decodes, 4-token pages,
    two micro-batches; greedy tokens identical to SDPA, logits equal to rounding."""
    import sys

    from cluster.model import flashinfer_attention
    from cluster.model.transformer import MoETransformer

    reference = _reference_flashinfer()
    monkeypatch.setitem(sys.modules, "flashinfer", reference)
    monkeypatch.setattr(flashinfer_attention, "flashinfer_declines",
                        lambda q, kv, hd, sinks, chunk, select: "sinks" if sinks else None)
    sdpa = LLMEngine.from_pretrained(str(checkpoint_factory(family, **overrides)), max_model_len=128)
    paged = flashinfer_attention.FlashInferAttention(torch.device("cpu"))
    model = MoETransformer(sdpa.cfg, sdpa.model.weights, sdpa.model.experts, 128, overlap=True,
                           paged_attention=paged)
    engines = [LLMEngine(sdpa.cfg, m, sdpa.tokenizer, max_model_len=128, block_size=4, max_num_batched_tokens=8)
               for m in (sdpa.model, model)]
    prompts = PROMPTS + [list(range(2, 60, 3))]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    (ref_tokens, ref_logits), (tokens, logits) = (run_recording_logits(e, prompts, params) for e in engines)
    assert tokens == ref_tokens
    worst = max((a - b).abs().max().item() for xs, ys in zip(logits, ref_logits) for a, b in zip(xs, ys))
    print(f"{family} {overrides}: paged vs SDPA max |logit diff| {worst:.2e}, calls {dict(paged.calls)}")
    assert worst < 1e-4
    assert paged.calls["decode"] > 0 and paged.calls["prefill"] > 0
    assert all(b is not None for b in paged.held)  # two micro-batches met
    assert reference.Paged.made <= 4  # kept and re-planned: decode and prefill, one each per micro-batch


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flashinfer_matches_sdpa_on_the_gpu(checkpoint_factory):
    """FlashInfer's paged decode and prefill against SDPA, both bf16 on the GPU (head_dim 64, a kernel size):
    chunked prefill beside decodes, greedy tokens identical, logits within bf16 rounding."""
    from cluster.model.attention_backend import flashinfer_missing
    missing = flashinfer_missing()
    assert missing is None, f"the gpu extra is not installed: {missing}"  # gpu-check installs it
    path = str(checkpoint_factory("qwen3_moe", head_dim=64))
    kw = dict(device="cuda", dtype="bfloat16", max_model_len=128, block_size=16, max_num_batched_tokens=16,
              cuda_graphs=False, kv_cache_memory_bytes=1 << 24)
    fi = LLMEngine.from_pretrained(path, attention_backend="flashinfer", **kw)
    sdpa = LLMEngine.from_pretrained(path, attention_backend="sdpa", **kw)
    prompts = PROMPTS + [list(range(2, 60, 3))]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    (tokens, logits), (ref_tokens, ref_logits) = (run_recording_logits(e, prompts, params) for e in (fi, sdpa))
    worst = max((a - b).abs().max().item() for xs, ys in zip(logits, ref_logits) for a, b in zip(xs, ys))
    print(f"FlashInfer vs SDPA, bf16: max |logit diff| {worst:.2e}, calls {dict(fi.model.paged_attention.calls)}")
    assert fi.model.paged_attention.calls["decode"] > 0 and fi.model.paged_attention.calls["prefill"] > 0
    assert worst < 0.1 and tokens == ref_tokens
