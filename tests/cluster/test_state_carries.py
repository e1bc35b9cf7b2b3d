"""The tiny recurrent test models keep their state long enough for the tests to see it: the builder
(tests/published_checkpoints.py, _slow_decay) sets the decay so a state carries over tens of tokens. With
transformers' init it was forgotten within a token (Qwen3-Next, Granite 4.0-H, Jamba) or too faint to move the
logits (Nemotron-H), and a state lost at a chunk boundary, on preemption or handed to another sequence went unseen.
Here: a state zeroed 16 tokens before the end moves the last logits by far more than the parity tolerance."""
import pytest

from cluster.engine import LLMEngine
from cluster.model.kv_cache import KVCache
from tests.cluster.helpers import TOLERANCE
from tests.helpers import make_batch
from tests.published_checkpoints import build

FAMILIES = ["Qwen3-Next-80B-A3B-Instruct", "NVIDIA-Nemotron-3-Nano-30B-A3B-BF16", "granite-4.0-h-small",
            "AI21-Jamba-1.5-Mini"]  # gated DeltaNet, Mamba-2 (two), Mamba-1
PROMPT = [(7 * i + 3) % 250 + 1 for i in range(48)]
CUT = 32  # the state is zeroed here, 16 tokens before the logits compared


def _last_logits(engine: LLMEngine, zero_state: bool):
    """The prompt in two forwards, the recurrent state zeroed between them or not → the last position's logits."""
    cache = KVCache.for_model(engine.cfg, num_blocks=4, block_size=16, dtype=engine.kv_dtype)
    table = cache.allocate(cache.num_blocks)
    engine.model.forward(make_batch([(table, PROMPT[:CUT], 0)], 16, engine.device), cache)
    if zero_state:
        cache.states.recurrent.zero_()
    logits, _ = engine.model.forward(make_batch([(table, PROMPT[CUT:], CUT)], 16, engine.device), cache)
    return logits[0]


@pytest.mark.parametrize("name", FAMILIES)
def test_a_state_zeroed_16_tokens_back_moves_the_logits(tmp_path, name):
    ours, _ = build(name, tmp_path)
    engine = LLMEngine.from_pretrained(str(ours), dtype="float32", max_model_len=64)
    moved = (_last_logits(engine, True) - _last_logits(engine, False)).abs().max().item()
    assert moved > 100 * TOLERANCE, f"{name}: the state moves the logits by {moved:.2e} only"
