"""Sampling at the edges of each parameter's type: served correctly or refused with the field
named, and one sequence's failure never touches another's (issue 10, items 2, 3 and 8)."""
import asyncio
import math

import pytest
import torch

from cluster.engine import InvalidRequest, LLMEngine, SamplingParams
from cluster.engine.async_engine import AsyncEngine, EngineDeadError, SequenceFailed
from cluster.engine.sampling import History, sample_row, shape_logits
from tests.helpers import load_hf

PROMPT = [5, 17, 33, 9]


@pytest.fixture(scope="module")
def engine(checkpoint_factory):
    return LLMEngine.from_pretrained(str(checkpoint_factory("mixtral")), max_model_len=256)


@pytest.mark.parametrize("field,value", [
    ("seed", 2**64), ("seed", -(2**63) - 1), ("temperature", math.inf), ("temperature", -1e-9),
    ("top_p", 0.0), ("logit_bias", ((3, 1e300),)), ("logit_bias", ((3, 100.5),)), ("presence_penalty", 2.5),
    ("frequency_penalty", math.nan), ("repetition_penalty", 0.0), ("min_tokens", 99), ("logprobs", 21),
    ("max_tokens", 0),
])
def test_values_the_sampler_cannot_handle_are_refused_naming_the_field(field, value):
    with pytest.raises(InvalidRequest) as e:
        SamplingParams(max_tokens=8, **{field: value}) if field != "max_tokens" else SamplingParams(max_tokens=0)
    assert e.value.param == field


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=3, seed=2**64 - 1, temperature=0.7),
    SamplingParams(max_tokens=3, seed=-(2**63), temperature=0.7),
    SamplingParams(max_tokens=3, temperature=1e-40),  # greedy: dividing by it would overflow
    SamplingParams(max_tokens=3, temperature=1e-6, top_p=1e-30, top_k=1),
    SamplingParams(max_tokens=3, temperature=3.0, top_p=1e-30),  # keeps the single most likely token
    SamplingParams(max_tokens=3, temperature=0.5, logit_bias=((7, -100.0), (8, 100.0))),
])
def test_edge_values_are_served(engine, params):
    [out] = engine.generate([PROMPT], params)
    assert len(out.token_ids) == 3 and all(0 <= t < engine.cfg.vocab_size for t in out.token_ids)


def test_tiny_temperature_equals_greedy(engine):
    greedy = engine.generate([PROMPT], SamplingParams(max_tokens=6, temperature=0))[0].token_ids
    assert engine.generate([PROMPT], SamplingParams(max_tokens=6, temperature=1e-40))[0].token_ids == greedy


def test_logit_bias_changes_the_choice(engine):
    greedy = engine.generate([PROMPT], SamplingParams(max_tokens=1, temperature=0))[0].token_ids[0]
    [out] = engine.generate([PROMPT], SamplingParams(max_tokens=1, temperature=0, logit_bias=((greedy, -100.0),)))
    assert out.token_ids[0] != greedy
    [out] = engine.generate([PROMPT], SamplingParams(max_tokens=2, temperature=0, logit_bias=((42, 100.0),)))
    assert out.token_ids == [42, 42]


def test_penalties_and_min_tokens_shape_the_logits():
    logits = torch.zeros(6)
    history = History(prompt_ids=[1], output_ids=[2, 2, 3], banned_early=(5,))
    shaped = shape_logits(logits, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, min_tokens=5),
                          history)
    assert shaped[2] == pytest.approx(-1.0) and shaped[3] == pytest.approx(-0.75) and shaped[0] == 0
    assert shaped[5] == -math.inf  # EOS banned before min_tokens
    rep = shape_logits(torch.tensor([2.0, -2.0, 1.0]), SamplingParams(repetition_penalty=2.0),
                       History([0], [1]))
    assert rep.tolist() == [1.0, -4.0, 1.0]
    # repeated tokens pushed down: greedy picks something else
    assert sample_row(torch.tensor([1.0, 0.9]), SamplingParams(temperature=0, frequency_penalty=2.0), None, 0,
                      History([], [0])).token_id == 1


def test_min_tokens_holds_back_eos(checkpoint_factory):
    path = checkpoint_factory("mixtral")
    engine = LLMEngine.from_pretrained(str(path), max_model_len=256)
    greedy = engine.generate([PROMPT], SamplingParams(max_tokens=1, temperature=0))[0].token_ids[0]
    [out] = engine.generate([PROMPT], SamplingParams(max_tokens=4, temperature=0, min_tokens=3,
                                                     stop_token_ids=(greedy,)))
    assert len(out.token_ids) >= 3 and greedy not in out.token_ids[:3]


def test_prompt_logprobs_match_transformers(checkpoint_factory, engine):
    hf = load_hf(checkpoint_factory("mixtral"))
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([PROMPT])).logits[0].float(), -1)  # [P, V]
    [out] = engine.generate([PROMPT], SamplingParams(max_tokens=0, prompt_logprobs=2, temperature=0))
    assert out.token_ids == [] and out.finish_reason == "length"
    scored = out.prompt_logprobs
    assert scored[0] is None and [s.token_id for s in scored[1:]] == PROMPT[1:]
    for r, s in enumerate(scored[1:]):
        assert abs(s.logprob - float(ref[r, PROMPT[r + 1]])) < 1e-4
        assert [t for t, _ in s.top_logprobs] == ref[r].topk(2).indices.tolist()
    # scoring and generating in one request: same prompt scores, then the greedy tokens
    [both] = engine.generate([PROMPT], SamplingParams(max_tokens=3, prompt_logprobs=0, temperature=0))
    assert [s.logprob for s in both.prompt_logprobs[1:]] == pytest.approx([s.logprob for s in scored[1:]], abs=1e-5)
    assert both.token_ids == engine.generate([PROMPT], SamplingParams(max_tokens=3, temperature=0))[0].token_ids


@pytest.fixture
def seed_666_fails(monkeypatch):
    """Sampling raises for requests seeded 666: a stand-in for any bug hit by one sequence only."""
    import cluster.engine.engine as eng

    real = eng.sample_row

    def flaky(logits, params, generator, argmax=None, history=None):
        if params.seed == 666:
            raise FloatingPointError("boom")
        return real(logits, params, generator, argmax, history)

    monkeypatch.setattr(eng, "sample_row", flaky)


def test_a_failing_sequence_fails_alone(engine, seed_666_fails):
    """A sequence whose sampling raises ends with an error; the others in its batch are unaffected."""
    expected = engine.generate([PROMPT], SamplingParams(max_tokens=5, temperature=0))[0].token_ids
    good = engine.add_request(PROMPT, SamplingParams(max_tokens=5, temperature=0))
    bad = engine.add_request(PROMPT, SamplingParams(max_tokens=5, temperature=0.5, seed=666))
    outs = {}
    while engine.has_unfinished():
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    assert outs[bad][-1].finish_reason == "error" and "boom" in outs[bad][-1].error
    assert [o.token_id for o in outs[good]] == expected
    assert engine.cache.num_free_blocks == engine.cache.num_blocks  # both sequences' blocks released


def test_engine_loop_survives_a_bad_command_and_reports_death(engine):
    async def run():
        ae = AsyncEngine(engine)
        try:
            with pytest.raises(InvalidRequest):  # fails only its own request
                async for _ in ae.generate([10**9], SamplingParams(max_tokens=2)):
                    pass
            got = [o.token_id async for batch in ae.generate(PROMPT, SamplingParams(max_tokens=3, temperature=0))
                   for o in batch]
            assert len(got) == 3 and ae.alive
            ae.engine = None  # a bug inside the loop: it must report itself dead, not hang requests
            await asyncio.sleep(0.2)
            ae._inbox.put(("add", "x", PROMPT, SamplingParams(), asyncio.get_running_loop(), asyncio.Queue()))
            ae._wake.set()
            for _ in range(100):
                if not ae.alive:
                    break
                await asyncio.sleep(0.05)
            assert not ae.alive
            with pytest.raises(EngineDeadError):
                async for _ in ae.generate(PROMPT, SamplingParams(max_tokens=2)):
                    pass
        finally:
            ae.engine = engine
            ae.shutdown()

    asyncio.run(run())


def test_sequence_failure_reaches_only_its_stream(engine, seed_666_fails):
    async def collect(ae, params):
        try:
            return [o.token_id async for batch in ae.generate(PROMPT, params) for o in batch]
        except SequenceFailed as e:
            return str(e)

    async def run():
        ae = AsyncEngine(engine)
        try:
            return await asyncio.gather(collect(ae, SamplingParams(max_tokens=4, temperature=0)),
                                        collect(ae, SamplingParams(max_tokens=4, temperature=0.5, seed=666)))
        finally:
            ae.shutdown()

    good, bad = asyncio.run(run())
    assert len(good) == 4 and "boom" in bad


def test_a_request_is_checked_once_in_its_process(engine, monkeypatch):
    """AsyncEngine checks a request on its event loop (or its caller did, `checked`: the router at
    admission); the engine thread does not check it again."""
    checks = []
    real = engine.prompts.validate
    monkeypatch.setattr(engine.prompts, "validate", lambda ids, *a: (checks.append(list(ids)), real(ids, *a))[1])
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)

    async def tokens(ae, **kw):
        return [o.token_id async for batch in ae.generate(PROMPT, params, **kw) for o in batch]

    async def run():
        ae = AsyncEngine(engine)
        try:
            plain = await tokens(ae)
            ae.validate(PROMPT, params)  # as the router's admission does
            return plain, await tokens(ae, checked=True)
        finally:
            ae.shutdown()

    plain, checked = asyncio.run(run())
    assert len(plain) == 3 and checked == plain
    assert checks == [PROMPT, PROMPT]  # one check per request
