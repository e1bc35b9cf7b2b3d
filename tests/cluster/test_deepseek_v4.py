"""DeepSeek-V4-Flash (sizes shrunk, stored under the release's tensor names) against transformers in fp32:
a prompt longer than the 128-token window and the HCA ratio, CSA layers with their indexer (index_topk as
released, and shrunk so it selects), hash-routed layers; greedy decode through our paged cache against
transformers' step-by-step decode with its own cache."""
import json
import shutil

import pytest
import torch

from cluster.engine import LLMEngine, SamplingParams
from cluster.errors import UnsupportedModelError
from cluster.families.deepseek_v4 import parse_config
from cluster.model.gating import Gating, route
from tests.deepseek_v4_checkpoints import build, load_reference, tiny_flash
from tests.helpers import hf_greedy_logits, our_greedy_logits

STEPS = 6
PROMPT = [(7 * i + 3) % 250 + 1 for i in range(150)]  # past the window (128) and one HCA entry (128)
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{index_topk: checkpoint dir}: as released (512: every compressed entry kept at this length) and 4."""
    released = build(tmp_path_factory.mktemp("dsv4") / "released")
    selecting = released.parent / "topk4"
    shutil.copytree(released, selecting)
    cfg = json.loads((selecting / "config.json").read_text())
    (selecting / "config.json").write_text(json.dumps({**cfg, "index_topk": 4}))
    return {512: released, 4: selecting}


@pytest.fixture(scope="module")
def runs(checkpoints):
    """Per index_topk: (ours: tokens, logits, engine; transformers: tokens, logits)."""
    out = {}
    for topk, path in checkpoints.items():
        engine = LLMEngine.from_pretrained(str(path), dtype="float32", max_num_seqs=2, max_model_len=256)
        out[topk] = (*our_greedy_logits(engine, PROMPT, STEPS), engine, *hf_greedy_logits(load_reference(path), PROMPT, STEPS))
    return out


@pytest.mark.parametrize("topk", [512, 4])
def test_matches_transformers_prefill_and_paged_decode(runs, topk):
    tokens, logits, engine, hf_tokens, hf_logits = runs[topk]
    worst = max((a - b).abs().max().item() for a, b in zip(logits, hf_logits))
    print(f"deepseek_v4 index_topk={topk}: max |logit diff| {worst:.2e} over {STEPS} steps")
    assert tokens == hf_tokens
    assert worst < TOLERANCE
    [out] = engine.generate([PROMPT], SamplingParams(max_tokens=STEPS, temperature=0, ignore_eos=True))
    assert out.token_ids == hf_tokens  # through the scheduler: paged blocks of 16, prefill then decode


def test_the_indexer_selects_when_index_topk_is_small(runs):
    """With 4 of ~37 compressed entries kept the output changes: the selection is exercised, not bypassed."""
    assert max((a - b).abs().max().item() for a, b in zip(runs[512][1], runs[4][1])) > 1e-3


def test_hash_layers_route_by_token_id_and_are_counted(runs, checkpoints):
    """route() exposes the fixed table's choice: the trace names tid2eid[token] on the hash layers, and the
    load accounting counts exactly those rows."""
    from safetensors.torch import load_file

    engine = runs[512][2]
    tables = load_file(str(checkpoints[512] / "model.safetensors"))
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, return_routing=True)
    prompt = [t + 1 for t in PROMPT[:20]]  # no prefix shared with the earlier requests: every row is computed
    before = engine.expert_load.total.clone()
    [out] = engine.generate([prompt], params)
    fed = prompt[-1:] + out.token_ids[:-1]  # the input of the forward pass that chose each token
    computed = prompt + out.token_ids[:-1]  # every row the experts saw
    for layer in (0, 1, 2):
        table = tables[f"layers.{layer}.ffn.gate.tid2eid"]
        assert [sorted(step[layer][1]) for step in out.routing] == [sorted(table[t].tolist()) for t in fed]
        expected = torch.bincount(table[computed].reshape(-1), minlength=engine.cfg.num_experts)
        assert torch.equal(engine.expert_load.total[layer] - before[layer], expected)


def test_sqrtsoftplus_with_fixed_ids_weighs_the_fixed_experts():
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.0]])
    fixed = torch.tensor([[1, 3]])
    weights, ids = route(logits, Gating(2, scoring="sqrtsoftplus", scale=1.5), fixed_ids=fixed)
    scores = torch.nn.functional.softplus(logits).sqrt()[0, [1, 3]]
    assert ids.tolist() == [[1, 3]]
    assert torch.allclose(weights[0], scores / scores.sum() * 1.5)


@pytest.mark.parametrize("changes, field", [
    ({"num_key_value_heads": 2}, "num_key_value_heads"),
    ({"compress_ratios": [0, 8, 128, 4, 0]}, "compress_ratios"),
    ({"compress_ratios": [0, 4]}, "compress_ratios"),
    ({"scoring_func": "softmax"}, "scoring_func"),
    ({"n_shared_experts": 2}, "n_shared_experts"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_refusals_name_the_field(changes, field):
    with pytest.raises(UnsupportedModelError, match=field):
        parse_config(tiny_flash(**changes))


def test_released_config_parses_to_its_layers():
    cfg = parse_config(tiny_flash())
    assert cfg.compress_ratios == (0, 4, 128, 4) and cfg.csa_ratio == 4
    assert cfg.hash_layers == (True, True, True, False)
    assert cfg.sliding_windows == (128,) * 4 and cfg.hc_mult == 4
    assert cfg.rope.theta == 10000 and cfg.rope.kind == "default"
    assert (cfg.compress_rope.kind, cfg.compress_rope.theta, cfg.compress_rope.factor) == ("yarn", 160000, 16)
    assert cfg.compress_rope.attention_factor == 1.0


def test_fp4_experts_and_fp8_blocks_as_released_match_transformers(tmp_path):
    """Stored as released (FP4 experts, FP8 blocks, UE8M0 `.scale` tensors): dequantised at load, equal to
    transformers on the same weights dequantised by the test's own code."""
    from cluster.loader import open_model
    from tests.deepseek_v4_checkpoints import build_quantized

    ours, reference = build_quantized(tmp_path)
    ckpt, _, cfg = open_model(str(ours))
    assert ckpt.info("layers.3.ffn.experts.0.w1.weight").shape == (cfg.expert_intermediate_size, cfg.hidden_size // 2)
    prompt = PROMPT[:40]
    engine = LLMEngine.from_pretrained(str(ours), dtype="float32", max_num_seqs=2, max_model_len=128)
    tokens, logits = our_greedy_logits(engine, prompt, 4)
    hf_tokens, hf_logits = hf_greedy_logits(load_reference(reference), prompt, 4)
    assert tokens == hf_tokens
    assert max((a - b).abs().max().item() for a, b in zip(logits, hf_logits)) < TOLERANCE


def test_split_experts_chunked_prefill_and_batching_keep_outputs(runs, checkpoints):
    """The rest of the engine with V4: two workers each reading only their half of the experts (FP4-free
    bf16 here), prompts prefilled 24 tokens a step (chunks ending mid-window) in blocks of 4 beside running decodes, and batched
    sequences all give transformers' greedy tokens."""
    from cluster.loader import load_experts, open_model
    from cluster.model.experts import LocalExperts
    from tests.cluster.helpers import Workers

    path, hf_tokens = checkpoints[4], runs[4][3]
    ckpt, family, cfg = open_model(str(path))
    pairs = cfg.experts()
    workers = [LocalExperts(load_experts(open_model(str(path))[0], family, cfg, half)) for half in (pairs[0::2], pairs[1::2])]
    split = LLMEngine.from_pretrained(str(path), dtype="float32", experts=Workers(workers), max_model_len=256)
    greedy = SamplingParams(max_tokens=STEPS, temperature=0, ignore_eos=True)
    assert split.generate([PROMPT], greedy)[0].token_ids == hf_tokens
    chunked = LLMEngine(split.cfg, runs[4][2].model, split.tokenizer, max_num_seqs=4, max_model_len=256,
                        max_num_batched_tokens=24, block_size=4)
    other = [t + 2 for t in PROMPT[:40]]
    whole = runs[4][2].generate([other], greedy)[0].token_ids
    outs = chunked.generate([PROMPT, other], greedy)
    assert [o.token_ids for o in outs] == [hf_tokens, whole]


def test_plan_counts_the_released_flash(tmp_path):
    """`moe-cluster plan` on V4-Flash's config.json as released: its published size (284B, 13B active), FP4
    experts dequantised, and the cache bytes of K=V plus the compressor inputs per token."""
    from cluster.sizing import format_sizing, sizing_from_config
    from tests.deepseek_v4_checkpoints import FLASH

    (tmp_path / "config.json").write_text(json.dumps(FLASH))
    text = format_sizing(sizing_from_config(str(tmp_path), workers=8, gpu_memory="141GiB"))
    assert "284.33 B total, 13.80 B active" in text
    assert "11008 routed" in text  # 43 layers x 256 experts; the MTP layer's are not counted
    assert "KV cache: 258.00 KiB per token" in text  # 43 x (512 + 4 x 512 + 4 x 128) x 2 bytes


def test_preemption_under_a_tiny_budget_gives_the_same_outputs(runs):
    """V4's state is all in the paged cache: preempted sequences are recomputed from their tokens, outputs
    unchanged, every block back at the end."""
    roomy = runs[4][2]
    prompts = [[(5 * i + 7 * j) % 250 + 1 for j in range(10 + i)] for i in range(4)]
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    per_block = roomy.cache.bytes_per_token * 4
    tight = LLMEngine(roomy.cfg, roomy.model, roomy.tokenizer, max_num_seqs=4, max_model_len=64, block_size=4,
                      kv_cache_memory_bytes=10 * per_block, enable_prefix_caching=False)
    assert tight.cache.num_blocks == 10
    assert [o.token_ids for o in tight.generate(prompts, greedy)] == [o.token_ids for o in roomy.generate(prompts, greedy)]
    assert tight.scheduler.num_preemptions > 0 and tight.cache.num_free_blocks == 10
