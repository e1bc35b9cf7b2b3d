"""A router killed mid-request on a model with recurrent state (Qwen3-Next): the request resumes on
another router, which replays it from its prompt with the request's seed and skips the outputs the
client already has (deployments/api/router_client.py, `GenerateRequest.skip`). Replay rebuilds the
recurrent and conv state of every DeltaNet layer from the prompt and the tokens generated again.

In process, not through Ray: a greedy and a seeded request, the kill at a chosen step. Served, a router is
killed under load with a Mamba-2 hybrid (Nemotron 3 Nano) in tests/deployments/test_scale_out.py::
test_router_killed_under_load_loses_no_request[recurrent_model]. Here the first engine is dropped mid-decode
with its state cache (the router's death), a second, built afresh from the checkpoint with other sequences
already holding state slots, replays."""
import pytest

from cluster.engine import LLMEngine, SamplingParams
from tests.published_checkpoints import build

NAME = "Qwen3-Next-80B-A3B-Instruct"
PROMPT = [(11 * i + 5) % 240 + 3 for i in range(70)]  # more than one chunk (64) of the chunked delta rule
OTHERS = [[(7 * i + 1) % 250 for i in range(12)], [42, 43, 44]]
STEPS, KILLED_AFTER = 10, 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    ours, _ = build(NAME, tmp_path_factory.mktemp("qwen3_next_resume"))
    return str(ours)


def _engine(path: str) -> LLMEngine:
    return LLMEngine.from_pretrained(path, dtype="float32", max_num_seqs=4, max_model_len=128)


def _delivered(engine: LLMEngine, request_id: str, count: int) -> list[int]:
    """Step until `count` tokens of the request have come out (what reached the client)."""
    out: list[int] = []
    while len(out) < count:
        out += [o.token_id for o in engine.step() if o.request_id == request_id]
    return out


@pytest.mark.parametrize("params", [SamplingParams(max_tokens=STEPS, temperature=0, ignore_eos=True),
                                    SamplingParams(max_tokens=STEPS, temperature=0.8, seed=11, ignore_eos=True)],
                         ids=["greedy", "seeded"])
def test_a_request_resumed_on_a_fresh_engine_replays_its_recurrent_state(checkpoint, params):
    expected = _engine(checkpoint).generate([PROMPT], params)[0].token_ids
    first = _engine(checkpoint)  # the router that dies: its neighbours' state beside the request's
    for other in OTHERS:
        first.add_request(other, SamplingParams(max_tokens=STEPS, temperature=0, ignore_eos=True))
    delivered = _delivered(first, first.add_request(PROMPT, params), KILLED_AFTER)
    assert first.cache.states.num_free < first.cache.states.num_slots  # state was held when it died
    del first

    second = _engine(checkpoint)  # the other router: busy with its own sequences, their slots taken first
    for other in reversed(OTHERS):
        second.add_request(other, SamplingParams(max_tokens=STEPS, temperature=0.5, seed=1, ignore_eos=True))
    second.step()
    replayed = _delivered(second, second.add_request(PROMPT, params), STEPS)
    assert delivered == expected[:KILLED_AFTER]
    assert delivered + replayed[KILLED_AFTER:] == expected  # the client's stream, the skipped part dropped
    while second.has_unfinished():
        second.step()
    assert second.cache.states.num_free == second.cache.states.num_slots  # every slot given back
