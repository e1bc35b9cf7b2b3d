"""The in-process engine: batching invariance, sampling controls, stops, aborts, validation."""
import pytest
import torch

from cluster.engine import InvalidRequest, LLMEngine, SamplingParams
from tests.helpers import run_recording_logits

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(checkpoint_factory):
    return LLMEngine.from_pretrained(str(checkpoint_factory("qwen2_moe")), max_num_seqs=16, max_model_len=256)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_batch_of_8_equals_each_prompt_alone(checkpoint_factory, family):
    engine = LLMEngine.from_pretrained(str(checkpoint_factory(family)), max_num_seqs=16, max_model_len=256)
    prompts = [[(7 * i + j) % 120 + 1 for j in range(n)] for i, n in enumerate([1, 3, 9, 17, 30, 4, 55, 2])]
    batched_tokens, batched_logits = run_recording_logits(engine, prompts, GREEDY)
    for prompt, tokens, logits in zip(prompts, batched_tokens, batched_logits):
        alone_tokens, alone_logits = run_recording_logits(engine, [prompt], GREEDY)
        assert tokens == alone_tokens[0]
        worst = max((a - b).abs().max().item() for a, b in zip(logits, alone_logits[0]))
        assert worst < 1e-5, worst


def test_sequences_join_and_leave_between_steps(engine):
    a = engine.add_request([1, 2, 3], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    engine.step()
    b = engine.add_request([4, 5], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    running = []
    while engine.has_unfinished():
        running.append(sorted(o.request_id for o in engine.step()))
    assert running == [[a, b], [a, b], [b], [b], [b]]
    assert engine.free_seq_slots == 16 and engine.cache.num_free_blocks == engine.cache.num_blocks


def test_more_requests_than_slots_all_finish(checkpoint_factory):
    engine = LLMEngine.from_pretrained(str(checkpoint_factory("mixtral")), max_num_seqs=3, max_model_len=64)
    outs = engine.generate([[i + 1] * (i + 1) for i in range(10)], SamplingParams(max_tokens=4, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [4] * 10
    assert engine.free_seq_slots == 3 and engine.cache.num_free_blocks == engine.cache.num_blocks


def test_seed_makes_sampling_reproducible(engine):
    p = SamplingParams(max_tokens=16, temperature=1.0, seed=123, ignore_eos=True)
    a, b = engine.generate([[1, 2, 3], [1, 2, 3]], p)
    assert a.token_ids == b.token_ids
    c = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=16, temperature=1.0, seed=7, ignore_eos=True))[0]
    assert c.token_ids != a.token_ids


def test_top_k_1_and_tiny_top_p_are_greedy(engine):
    greedy = engine.generate([[9, 8, 7]], GREEDY)[0].token_ids
    for p in (SamplingParams(max_tokens=12, temperature=1.5, top_k=1, seed=1, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=1.5, top_p=1e-6, seed=1, ignore_eos=True)):
        assert engine.generate([[9, 8, 7]], p)[0].token_ids == greedy


def test_top_k_restricts_choices(engine):
    p = SamplingParams(max_tokens=1, temperature=5.0, top_k=3, logprobs=3, ignore_eos=True)
    for seed in range(20):
        out = engine.generate([[4, 4]], SamplingParams(**{**p.__dict__, "seed": seed}))[0]
        assert out.token_ids[0] in {t for t, _ in out.logprobs[0].top_logprobs}


def test_logprobs(engine):
    out = engine.generate([[5, 6]], SamplingParams(max_tokens=3, temperature=0, logprobs=2, ignore_eos=True))[0]
    assert len(out.logprobs) == 3
    for s in out.logprobs:
        top_ids = [t for t, _ in s.top_logprobs]
        assert s.token_id == top_ids[0] and s.logprob == pytest.approx(s.top_logprobs[0][1])
        assert s.logprob <= 0


def test_stop_token_ids_and_max_tokens(engine):
    full = engine.generate([[3, 1, 4]], GREEDY)[0].token_ids
    stop_at = full[4]
    out = engine.generate([[3, 1, 4]], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(stop_at,),
                                                      ignore_eos=True))[0]
    assert out.token_ids == full[: full.index(stop_at) + 1] and out.finish_reason == "stop"
    assert engine.generate([[3, 1, 4]], GREEDY)[0].finish_reason == "length"


def test_abort_frees_the_kv_blocks(engine):
    rid = engine.add_request([1, 2, 3], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.free_seq_slots == 15 and engine.cache.num_free_blocks == engine.cache.num_blocks - 1
    assert engine.abort(rid)
    assert engine.free_seq_slots == 16 and not engine.has_unfinished()
    assert engine.cache.num_free_blocks == engine.cache.num_blocks
    assert engine.generate([[1, 2]], GREEDY)[0].finish_reason == "length"


@pytest.mark.parametrize("kwargs,param", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(logprobs=100), "logprobs"), (dict(stop=("",)), "stop")])
def test_bad_sampling_params_name_the_field(kwargs, param):
    with pytest.raises(InvalidRequest) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param and param in str(e.value)


@pytest.mark.parametrize("prompt,param", [([], "prompt"), ([-1], "prompt"), ([128], "prompt"),
                                          ("text but no tokenizer", "prompt")])
def test_bad_prompts(engine, prompt, param):
    with pytest.raises(InvalidRequest) as e:
        engine.add_request(prompt, GREEDY)
    assert e.value.param == param


def test_prompt_plus_max_tokens_over_context(engine):
    with pytest.raises(InvalidRequest, match="exceeds the context length") as e:
        engine.add_request([1] * 250, SamplingParams(max_tokens=10))
    assert e.value.param == "max_tokens"


def test_routing_read_once_per_step_is_each_sequences_own(engine, monkeypatch):
    """return_routing: each token's routing (read to the host once per step) is its own sequence's, the
    same batched as alone; greedy steps leave the [B, V] logits on the device."""
    from cluster.engine import engine as engine_module

    reads = []
    real = engine_module._reads_logits
    monkeypatch.setattr(engine_module, "_reads_logits", lambda s: reads.append(real(s)) or reads[-1])
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, return_routing=True)
    prompts = [[5, 17, 33, 2], [9, 4], list(range(3, 30, 3))]
    batched = engine.generate(prompts, params)
    assert reads and not any(reads)  # greedy without logprobs: only the argmax crossed to the host
    for prompt, out in zip(prompts, batched):
        [alone] = engine.generate([prompt], params)
        assert len(out.routing) == 5 and out.token_ids == alone.token_ids
        for a, b in zip(out.routing, alone.routing):  # ids exactly, weights to batch-shape rounding
            assert [(layer, ids) for layer, ids, _ in a] == [(layer, ids) for layer, ids, _ in b]
            assert torch.allclose(torch.tensor([w for *_, w in a]), torch.tensor([w for *_, w in b]), atol=1e-5)
        assert all(len(ids) == engine.cfg.top_k for _, ids, _ in out.routing[0])
    sampled = SamplingParams(max_tokens=2, temperature=0.8, seed=1, logprobs=2)
    reads.clear()
    engine.generate([prompts[0]], sampled)
    assert reads and all(reads)


def test_a_prompt_longer_than_the_context_names_the_prompt(engine):
    """Whatever max_tokens is: the prompt must be shortened, so the error names it, not max_tokens."""
    limit = min(engine.prompts.max_model_len, engine.prompts.kv_capacity)
    with pytest.raises(InvalidRequest, match=rf"prompt: {limit} tokens leave no room .* \({limit} tokens\)") as e:
        engine.add_request([1] * limit, SamplingParams(max_tokens=1))
    assert e.value.param == "prompt"
    engine.validate([1] * (limit - 1), SamplingParams(max_tokens=1))  # one token of room is enough
