"""Published MoE configs (sizes shrunk), built with transformers and stored as released (bf16,
FP8 blocks, MXFP4): our engine in fp32 against transformers in fp32 on the same (dequantised)
weights, greedy tokens and logits at every step."""
import pytest

from cluster.engine import LLMEngine, SamplingParams
from tests.helpers import hf_greedy_logits, load_hf, our_greedy_logits
from tests.published_checkpoints import build
from tests.published_configs import PUBLISHED

STEPS = 16
PROMPT = [5, 17, 33, 2, 90, 41, 7, 11, 64, 3]
# gpt-oss slides a 128-token window on every other layer: its prompt is longer than that.
LONG_PROMPT = [(7 * i + 3) % 250 + 1 for i in range(150)]
TOLERANCE = 1e-4


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
    prompt = LONG_PROMPT if name.startswith("gpt-oss") else PROMPT
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


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_prefix_caching_keeps_outputs(published, name):
    """Greedy and seeded outputs with the prefix cache on equal those with it off: the second and third
    prompts share the first one's leading blocks (past gpt-oss's sliding window), then differ."""
    ours, _ = published(name)
    base = LONG_PROMPT if name.startswith("gpt-oss") else PROMPT * 2
    prompts = [base, base[:-3] + [9, 8, 7], base[:-5] + [4]]
    seeded = SamplingParams(max_tokens=6, temperature=0.8, seed=11, ignore_eos=True)
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    on = LLMEngine.from_pretrained(str(ours), dtype="float32", max_num_seqs=2, max_model_len=256, block_size=4)
    off = LLMEngine(on.cfg, on.model, on.tokenizer, max_num_seqs=2, max_model_len=256, block_size=4,
                    enable_prefix_caching=False)
    runs = [(p, sp) for p in prompts for sp in (greedy, seeded)]
    got = [on.generate([p], sp)[0] for p, sp in runs]
    assert [o.token_ids for o in got] == [off.generate([p], sp)[0].token_ids for p, sp in runs]
    limit = on.scheduler.prefix_caching.max_len
    if limit is None or len(base) <= limit:
        assert all(o.cached_tokens > 0 for o in got[1:])
    print(f"{name}: cached tokens per request {[o.cached_tokens for o in got]}, outputs identical")


@pytest.mark.parametrize("name", ["Qwen3-30B-A3B+YaRN", "gpt-oss-20b", "DeepSeek-V3"])  # RoPE scaling, windows, MLA
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
