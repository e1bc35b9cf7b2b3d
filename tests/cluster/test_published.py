"""Published MoE configs (sizes shrunk), built with transformers and stored as released (bf16,
FP8 blocks, MXFP4): our engine in fp32 against transformers in fp32 on the same (dequantised)
weights, greedy tokens and logits at every step."""
import json
import math

import pytest
import torch

from cluster.engine import LLMEngine, SamplingParams
from cluster.families import resolve
from cluster.sizing import format_sizing, sizing_from_config
from tests.cluster.helpers import PROMPT, STEPS, TOLERANCE, Workers
from tests.helpers import hf_greedy_logits, load_hf, our_greedy_logits
from tests.published_checkpoints import build
from tests.published_configs import PUBLISHED, tiny

LONG_PROMPT = [(7 * i + 3) % 250 + 1 for i in range(150)]


def _hybrid(name: str) -> bool:
    family, text = resolve(tiny(name))
    return family.parse_config(text).hybrid


def _prompt(name: str) -> list[int]:
    """gpt-oss slides a 128-token window on every other layer; hybrid models' prefill runs the delta rule in
    chunks of 64: their prompt crosses two chunk boundaries."""
    return LONG_PROMPT if name.startswith("gpt-oss") or _hybrid(name) else PROMPT


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    made = {}

    def make(name: str):
        if name not in made:
            made[name] = build(name, tmp_path_factory.mktemp(name.replace(".", "_")))
        return made[name]

    return make


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_config_matches_transformers(published, name):
    ours, reference = published(name)
    prompt = _prompt(name)
    engine = LLMEngine.from_pretrained(str(ours), dtype="float32", max_num_seqs=2, max_model_len=256)
    hf_tokens, hf_logits = hf_greedy_logits(load_hf(reference), prompt, STEPS)
    tokens, logits = our_greedy_logits(engine, prompt, STEPS)
    worst = max((a - b).abs().max().item() for a, b in zip(logits, hf_logits))
    scale = max(b.abs().max().item() for b in hf_logits)
    print(f"{name}: max |logit diff| {worst:.2e} over {STEPS} steps (logits up to {scale:.2f}), "
          f"tokens identical: {tokens == hf_tokens}")
    assert tokens == hf_tokens
    assert worst < TOLERANCE
    [out] = engine.generate([prompt], SamplingParams(max_tokens=STEPS, temperature=0, ignore_eos=True))
    assert out.token_ids == hf_tokens


# Families added by issue 18 (part 1): beside matching transformers, the expert machinery works on them.
NEW_FAMILIES = ["MiniMax-M2", "dbrx-instruct", "Llama-4-Scout-17B-16E", "Llama-4-Maverick-17B-128E-Instruct",
                "Qwen3-Next-80B-A3B-Instruct",  # issue 19: the hybrid (recurrent state) family too
                "gemma-4-26B-A4B-it",  # its dense MLP stays with the router, only the routed experts split
                "NVIDIA-Nemotron-3-Nano-30B-A3B-BF16",  # non-gated (squared-ReLU) experts, on workers too
                "NVIDIA-Nemotron-3-Super-120B-A12B-BF16"]  # the workers' experts at the latent width


@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_new_family_experts_split_traced_and_counted(published, name):
    """Two workers each read only their half of the experts' bytes and give the in-process output;
    the routing trace names top_k distinct experts per MoE layer and token; load accounting counts
    every routed row."""
    from cluster.loader import load_experts, open_model
    from cluster.model.experts import LocalExperts

    ours, _ = published(name)
    ckpt, family, cfg = open_model(str(ours))
    pairs = cfg.experts()
    load_experts(ckpt, family, cfg, pairs)
    workers = []
    for half in (pairs[0::2], pairs[1::2]):
        worker_ckpt, _, _ = open_model(str(ours))
        workers.append(LocalExperts(load_experts(worker_ckpt, family, cfg, half)))
        assert worker_ckpt.bytes_read == ckpt.bytes_read // 2
    local = LLMEngine.from_pretrained(str(ours), dtype="float32", max_model_len=64)
    split = LLMEngine.from_pretrained(str(ours), dtype="float32", experts=Workers(workers), max_model_len=64)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, return_routing=True)
    [out] = local.generate([PROMPT], params)
    assert split.generate([PROMPT], params)[0].token_ids == out.token_ids
    assert len(out.routing) == len(out.token_ids)
    for token in out.routing:
        assert [layer for layer, _, _ in token] == list(cfg.moe_layer_ids)
        assert all(len(set(ids)) == cfg.top_k and all(0 <= e < cfg.num_experts for e in ids) for _, ids, _ in token)
    totals = local.expert_load.snapshot()["total_tokens"]
    assert [sum(t) for t in totals] == [(len(PROMPT) + 5) * cfg.top_k] * len(cfg.moe_layer_ids)


@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_new_family_plans_from_its_released_config(tmp_path, name):
    """`moe-cluster plan` reads the config.json as released (full sizes, no weights)."""
    import json

    from cluster.sizing import format_sizing, sizing_from_config

    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED[name]))
    p = sizing_from_config(str(tmp_path), workers=8)
    assert p.total_params > p.active_params > 0 and "total" in format_sizing(p)
    print(format_sizing(p))


def test_gemma4_two_micro_batches_and_kv_pools(published):
    """Gemma 4's sliding and full layers cache their own shapes, one pool each; run as two micro-batches
    (the overlap remote experts use: the dense MLP computed while the expert rows are away), a batch of
    prompts past the window gives the one-micro-batch outputs."""
    from cluster.model.parallel import ParallelDenseTransformer

    ours, _ = published("gemma-4-26B-A4B-it")
    plain = LLMEngine.from_pretrained(str(ours), dtype="float32", max_num_seqs=4, max_model_len=64)
    assert [(k.shape[0], *k.shape[2:]) for k, _ in plain.cache.pools] == [(5, 2, 16), (1, 1, 32)]
    model = plain.model
    split = ParallelDenseTransformer(plain.cfg, model.weights, model.experts, 64, overlap=True)
    overlapped = LLMEngine(plain.cfg, split, plain.tokenizer, max_num_seqs=4, max_model_len=64)
    prompts = [PROMPT * 2, PROMPT[:3], [9, 8, 7, 6, 5, 4, 3, 2, 1, 11, 12, 13]]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    assert [o.token_ids for o in overlapped.generate(prompts, params)] == \
        [o.token_ids for o in plain.generate(prompts, params)]


# (published config, a change, the field the error names): what these families refuse.
NEW_FAMILY_REFUSALS = [
    ("MiniMax-M2", {"qk_norm_type": "per_head"}, "qk_norm_type"),
    ("MiniMax-M2", {"attn_type_list": [0, 1]}, "attn_type_list"),
    ("MiniMax-M2", {"scoring_func": "softmax"}, "scoring_func"),
    ("MiniMax-M2", {"shared_intermediate_size": 64}, "shared_intermediate_size"),
    ("MiniMax-M2", {"quantization_config": {"quant_method": "fp8", "fmt": "float8_e5m2",
                                            "weight_block_size": [128, 128]}}, "quantization_config.fmt"),
    ("dbrx-instruct", {"ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 16, "moe_top_k": 4,
                                      "moe_normalize_expert_weights": 2.0}}, "ffn_config.moe_normalize_expert_weights"),
    ("dbrx-instruct", {"ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 16, "moe_top_k": 4,
                                      "ffn_act_fn": {"name": "gelu"}}}, "hidden_act"),
    ("Llama-4-Scout-17B-16E", {"text_config": {**tiny("Llama-4-Scout-17B-16E")["text_config"],
                                                "no_rope_layers": [1, 0]}}, "no_rope_layers"),
    ("Llama-4-Scout-17B-16E", {"text_config": {**tiny("Llama-4-Scout-17B-16E")["text_config"],
                                                "layer_types": ["full_attention"] * 4}}, "layer_types"),
    ("Llama-4-Scout-17B-16E", {"text_config": {**tiny("Llama-4-Scout-17B-16E")["text_config"],
                                                "attention_bias": True}}, "attention_bias"),
]


@pytest.mark.parametrize("name,changes,field", NEW_FAMILY_REFUSALS)
def test_new_family_refusals_name_the_field(name, changes, field):
    from cluster.errors import UnsupportedModelError
    from cluster.families import get_family

    cfg = {**tiny(name), **changes}
    with pytest.raises(UnsupportedModelError, match=field.replace(".", r"\.")):
        get_family(cfg["model_type"]).parse_config(cfg)


@pytest.mark.parametrize("position,chunk,window,seen", [
    (9, 8, None, [8, 9]),  # chunked: only its own chunk, up to itself
    (7, 8, None, list(range(8))),
    (9, None, 3, [7, 8, 9]),  # sliding window, for contrast
    (9, 8, 3, [8, 9]),
])
def test_chunked_attention_sees_its_own_chunk(position, chunk, window, seen):
    from cluster.model.attention import visible

    mask = visible(torch.tensor([position + 1]), position + 1, 1, window, chunk)  # [1, 1, C]
    assert mask[0, 0].nonzero().flatten().tolist() == seen


def test_query_temperature_is_one_below_floor_scale():
    """Llama 4's NoPE query scale: log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1."""
    from cluster.model.attention import query_temperature

    got = query_temperature(torch.tensor([0, 8190, 8191, 16383]), 8192.0, 0.1).tolist()
    assert got == pytest.approx([1.0, 1.0, 1 + 0.1 * math.log(2), 1 + 0.1 * math.log(3)])


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_plan_prints_for_the_released_config(name, tmp_path):
    """`moe-cluster plan` on the config as released (full size; Phi's rope factors are stored shrunk,
    so its shrunk config): every routed expert counted."""
    config = tiny(name) if name.startswith("Phi") else PUBLISHED[name]
    (tmp_path / "config.json").write_text(json.dumps(config))
    text = format_sizing(sizing_from_config(str(tmp_path), workers=8))
    family, text_config = resolve(config)
    cfg = family.parse_config(text_config)
    assert f"experts: {len(cfg.experts())} routed" in text and "fits:" in text


def one_config_per_model_type() -> list[str]:
    """The prefix cache changes only which keys and values are computed, so one config per model type
    covers every attention shape we serve (windows, sinks, MLA, DSA, chunked attention); quantisation
    formats and RoPE variants of one type share its attention code."""
    first = {}
    for name in sorted(PUBLISHED):
        first.setdefault(PUBLISHED[name]["model_type"], name)
    return sorted(first.values())


@pytest.mark.parametrize("name", one_config_per_model_type())
def test_prefix_caching_keeps_outputs(published, name):
    """Greedy and seeded outputs with the prefix cache on equal those with it off: the second and third
    prompts share the first one's leading blocks (past gpt-oss's sliding window), then differ."""
    if _hybrid(name):
        pytest.skip("hybrid models compute every prompt whole (test_hybrid.py checks the refusal)")
    ours, _ = published(name)
    base = LONG_PROMPT if name.startswith("gpt-oss") else PROMPT * 2
    prompts = [base, base[:-3] + [9, 8, 7], base[:-5] + [4]]
    seeded = SamplingParams(max_tokens=6, temperature=0.8, seed=11, ignore_eos=True)
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    on = LLMEngine.from_pretrained(str(ours), dtype="float32", max_num_seqs=2, max_model_len=256, block_size=4)
    off = LLMEngine(on.cfg, on.model, on.tokenizer, max_num_seqs=2, max_model_len=256, block_size=4,
                    enable_prefix_caching=False)
    runs = [(p, greedy) for p in prompts] + [(prompts[2], seeded)]
    got = [on.generate([p], sp)[0] for p, sp in runs]
    assert [o.token_ids for o in got] == [off.generate([p], sp)[0].token_ids for p, sp in runs]
    limit = on.scheduler.prefix_caching.max_len
    if limit is None or len(base) <= limit:
        assert all(o.cached_tokens > 0 for o in got[1:])
    print(f"{name}: cached tokens per request {[o.cached_tokens for o in got]}, outputs identical")


# RoPE scaling, windows, MLA, per-layer KV shapes (Gemma 4: a prompt past its window of 8)
@pytest.mark.parametrize("name", ["Qwen3-30B-A3B+YaRN", "gpt-oss-20b", "DeepSeek-V3", "gemma-4-26B-A4B-it"])
def test_chunked_prefill_keeps_outputs(published, name):
    """Prompts prefilled 8 tokens a step beside running decodes give the greedy and seeded outputs
    of whole-prompt prefill."""
    ours, _ = published(name)
    base = LONG_PROMPT if name.startswith("gpt-oss") else PROMPT * 3
    prompts = [PROMPT, base, base[:-4] + [9, 8]]
    params = [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=6, temperature=0.8, seed=5, ignore_eos=True)] * 2
    whole = LLMEngine.from_pretrained(str(ours), dtype="float32", max_num_seqs=4, max_model_len=256,
                                      enable_chunked_prefill=False, enable_prefix_caching=False)
    chunked = LLMEngine(whole.cfg, whole.model, whole.tokenizer, max_num_seqs=4, max_model_len=256,
                        max_num_batched_tokens=8, block_size=4)
    expected = [o.token_ids for o in whole.generate(prompts, params[:3])]
    assert [o.token_ids for o in chunked.generate(prompts, params[:3])] == expected
