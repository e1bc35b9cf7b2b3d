"""Published MoE configs (sizes shrunk), built with transformers and stored as released (bf16,
FP8 blocks, MXFP4): our engine in fp32 against transformers in fp32 on the same (dequantised)
weights, greedy tokens and logits at every step."""
import json

import pytest

from cluster.engine import LLMEngine, SamplingParams
from cluster.families import resolve
from cluster.plan import format_plan, plan_from_config
from tests.helpers import hf_greedy_logits, load_hf, our_greedy_logits
from tests.published_checkpoints import build
from tests.published_configs import PUBLISHED, tiny

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
def test_plan_prints_for_the_released_config(name, tmp_path):
    """`moe-cluster plan` on the config as released (full size; Phi's rope factors are stored shrunk,
    so its shrunk config): every routed expert counted."""
    config = tiny(name) if name.startswith("Phi") else PUBLISHED[name]
    (tmp_path / "config.json").write_text(json.dumps(config))
    text = format_plan(plan_from_config(str(tmp_path), workers=8))
    family, text_config = resolve(config)
    cfg = family.parse_config(text_config)
    assert f"experts: {len(cfg.experts())} routed" in text and "fits:" in text
