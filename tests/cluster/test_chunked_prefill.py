"""Chunked prefill: a step runs the decodes plus at most max_num_batched_tokens - decodes prompt
tokens, a long prompt takes several steps, the running streams get a token every step, and the
outputs are those of whole-prompt prefill."""
from cluster.engine import LLMEngine, SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
LONG = [(3 * i + 1) % 115 + 1 for i in range(40)]


def test_a_long_prompt_is_prefilled_beside_running_decodes(checkpoint_factory):
    path = str(checkpoint_factory("mixtral"))
    whole = LLMEngine.from_pretrained(path, max_num_seqs=4, max_model_len=64, enable_chunked_prefill=False,
                                      enable_prefix_caching=False)
    expected = [o.token_ids for o in whole.generate([[5, 6, 7], [8, 9], LONG], GREEDY)]
    engine = LLMEngine(whole.cfg, whole.model, max_num_seqs=4, max_model_len=64, max_num_batched_tokens=8,
                       block_size=4)
    ids = [engine.add_request(p, GREEDY) for p in ([5, 6, 7], [8, 9])]
    engine.step()  # both short prompts in one step
    long_id = engine.add_request(LONG, GREEDY)
    long_seq, steps_to_first_token = engine.scheduler.find(long_id), 0
    while not long_seq.output_ids:
        outs = engine.step()
        steps_to_first_token += 1
        assert sum(s.num_new for s in engine.scheduler.running) <= 8
        assert {o.request_id for o in outs} >= set(ids)  # the running streams got a token every step
    assert steps_to_first_token == 7  # 40 prompt tokens, 6 a step beside the two decodes
    while engine.has_unfinished():
        engine.step()
    got = [engine.scheduler.find(i) for i in ids]
    assert got == [None, None]
    assert long_seq.output_ids == expected[2]
    assert [o.token_ids for o in engine.generate([[5, 6, 7], [8, 9]], GREEDY)] == expected[:2]


def test_a_prompt_that_runs_whole_does_not_wait_for_the_decodes_to_end(checkpoint_factory):
    """Without chunking, a prompt longer than what the running decodes leave of the step's budget joins a
    step with no other prompt in it (that step runs over the budget by the decodes), instead of waiting
    until every running stream has ended; the same for prompt logprobs, which are scored whole."""
    path = str(checkpoint_factory("mixtral"))
    base = LLMEngine.from_pretrained(path, max_num_seqs=4, max_model_len=64, enable_prefix_caching=False)
    expected = base.generate([LONG], GREEDY)[0].token_ids
    for chunked, params in ((False, GREEDY), (True, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                                                                   prompt_logprobs=0))):
        engine = LLMEngine(base.cfg, base.model, max_num_seqs=4, max_model_len=64, max_num_batched_tokens=40,
                           enable_chunked_prefill=chunked, enable_prefix_caching=False, block_size=4)
        streams = [engine.add_request(p, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
                   for p in ([5, 6, 7], [8, 9])]
        engine.step()
        long_id = engine.add_request(LONG, params)  # 40 tokens: the budget, less the two decodes, is 38
        long_seq = engine.scheduler.find(long_id)
        engine.step()
        assert long_seq.num_computed >= len(LONG) and engine.scheduler.find(streams[0]) is not None
        while engine.has_unfinished():
            engine.step()
        assert long_seq.output_ids == expected
