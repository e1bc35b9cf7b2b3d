"""Automatic prefix caching: the block pool's bookkeeping (names, holds, LRU eviction) and the
engine's outputs with it, which must be exactly those without it."""
import pytest

from cluster.engine import LLMEngine, SamplingParams
from cluster.model.block_pool import BlockPool, block_hashes

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
SYSTEM = [(7 * i + 3) % 110 + 1 for i in range(12)]  # three blocks of 4 tokens
TAILS = [[90, 91, 92], [93, 94, 95, 96, 97], [98]]


def test_block_names_chain_and_only_full_blocks_are_named():
    a = block_hashes(list(range(10)), 4)
    assert len(a) == 2  # the last two tokens make no full block
    assert block_hashes(list(range(8)) + [99, 99], 4) == a  # a block's name depends on its prefix only
    assert block_hashes([0, 1, 2, 3, 9, 5, 6, 7], 4)[1] != a[1]  # ...and all of it
    assert block_hashes(list(range(10)), 4, extra=b"bf16") != a
    assert block_hashes(list(range(10)), 4, parent=a[0], start=4) == a[1:]


@pytest.mark.parametrize("rows", [
    # (blocks held then released, in release order, named?) -> which free block a fresh allocation takes
    ("unnamed blocks go before any cached one", [([0, 1], True), ([2], False)], 2),
    ("least recently released cached block first", [([0], True), ([1], True)], 0),
    ("a sequence's tail before its head", [([0, 1, 2], True)], 2),
])
def test_eviction_order(rows):
    _, released, evicted_first = rows
    pool = BlockPool(3)
    held = pool.allocate(3)
    assert held == [0, 1, 2] and pool.num_free == 0
    for blocks, named in released:
        for b in blocks:
            if named:
                pool.name(b, bytes([b]))
        pool.release(blocks)
    assert pool.allocate(1) == [evicted_first]


def test_holds_names_and_eviction_count():
    pool = BlockPool(2)
    [a] = pool.allocate(1)
    pool.name(a, b"x")
    pool.take(pool.cached([b"x", b"y"]))  # a second sequence shares block a
    assert pool.cached([b"x", b"y"]) == [a] and pool.num_free == 1
    pool.release([a])
    assert pool.num_free == 1  # still held once
    pool.release([a])
    assert pool.num_free == 2 and pool.num_cached == 1 and pool.num_idle([a]) == 1
    pool.allocate(2)  # needs every block: the cached one is evicted
    assert pool.num_evictions == 1 and pool.cached([b"x"]) == [] and pool.num_cached == 0
    [b] = BlockPool(1).allocate(1)
    other = BlockPool(2)
    other.name(0, b"x")
    other.name(1, b"x")  # computed twice at once: the first block keeps the name
    assert other.cached([b"x"]) == [0] and b == 0


def _engines(path, **kw):
    on = LLMEngine.from_pretrained(path, max_num_seqs=4, max_model_len=64, block_size=4, **kw)
    off = LLMEngine.from_pretrained(path, max_num_seqs=4, max_model_len=64, block_size=4,
                                    enable_prefix_caching=False, **kw)
    return on, off


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])  # plain and latent (MLA) caches
def test_requests_differing_after_the_first_blocks_reuse_them(checkpoint_factory, family):
    on, off = _engines(str(checkpoint_factory(family)))
    seeded = SamplingParams(max_tokens=6, temperature=0.9, seed=3, ignore_eos=True)
    prompts = [SYSTEM + t for t in TAILS]
    expected = [o.token_ids for o in off.generate(prompts, GREEDY)] + [off.generate(prompts[:1], seeded)[0].token_ids]
    first = on.generate(prompts[:1], GREEDY)[0]
    rest = on.generate(prompts[1:], GREEDY)
    again = on.generate(prompts[:1], seeded)[0]
    assert [first.token_ids, *(o.token_ids for o in rest), again.token_ids] == expected
    assert first.cached_tokens == 0 and [o.cached_tokens for o in rest] == [12, 12] and again.cached_tokens == 12
    stats = on.scheduler.prefix_stats
    assert stats.hit_tokens == 36 and stats.query_tokens == sum(map(len, prompts)) + len(prompts[0])
    # cached tokens are not expert load: the later requests computed only their tails
    assert rest[0].expert_tokens < first.expert_tokens
    assert on.cache.num_free_blocks == on.cache.num_blocks  # cached blocks nobody holds count as free


def test_a_whole_cached_prompt_still_computes_its_last_token(checkpoint_factory):
    on, off = _engines(str(checkpoint_factory("mixtral")))
    expected = off.generate([SYSTEM], GREEDY)[0].token_ids
    on.generate([SYSTEM + [5, 6, 7, 8]], GREEDY)
    out = on.generate([SYSTEM], GREEDY)[0]
    assert out.token_ids == expected and out.cached_tokens == 8  # 3 full blocks, the last one recomputed


def test_prompt_logprobs_skip_the_cache(checkpoint_factory):
    on, off = _engines(str(checkpoint_factory("mixtral")))
    scored = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1)
    expected = off.generate([SYSTEM + TAILS[0]], scored)[0].prompt_logprobs
    on.generate([SYSTEM + TAILS[1]], GREEDY)
    out = on.generate([SYSTEM + TAILS[0]], scored)[0]
    assert out.cached_tokens == 0
    assert [p and (p.token_id, round(p.logprob, 5)) for p in out.prompt_logprobs] == \
        [p and (p.token_id, round(p.logprob, 5)) for p in expected]


def test_eviction_preemption_and_abort_with_shared_blocks(checkpoint_factory):
    """A pool of 10 blocks of 4 tokens: four requests share 3 blocks of system prompt and need ~4 more
    each, so decoding preempts some (their shared blocks stay with the others), one is aborted while
    its blocks are shared, and a last request with another prefix must evict cached blocks."""
    path = str(checkpoint_factory("mixtral"))
    roomy = LLMEngine.from_pretrained(path, max_num_seqs=4, max_model_len=64, block_size=4,
                                      enable_prefix_caching=False)
    prompts = [SYSTEM + t for t in TAILS] + [SYSTEM + [99, 98]]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    expected = [o.token_ids for o in roomy.generate(prompts, params)]
    other = [(5 * i) % 100 + 1 for i in range(30)]
    expected_other = roomy.generate([other], params)[0].token_ids
    tight = LLMEngine.from_pretrained(path, max_num_seqs=4, max_model_len=64, block_size=4,
                                      kv_cache_memory_bytes=10 * roomy.cache.bytes_per_token * 4)
    assert tight.cache.num_blocks == 10
    tight.generate(prompts[:1], SamplingParams(max_tokens=1, temperature=0))  # the system prompt is cached
    ids = [tight.add_request(p, params) for p in prompts]
    seqs = [tight.scheduler.find(i) for i in ids]
    tight.step()
    shared = seqs[0].blocks[0]
    assert all(s.blocks[0] == shared for s in seqs if s.blocks)
    assert tight.abort(ids[1])  # its shared blocks stay with the others
    assert tight.cache.blocks._refs[shared] >= 1
    while tight.has_unfinished():
        tight.step()
    assert tight.scheduler.num_preemptions > 0
    assert [s.output_ids for i, s in enumerate(seqs) if i != 1] == [e for i, e in enumerate(expected) if i != 1]
    evictions = tight.cache.blocks.num_evictions
    assert tight.generate([other], params)[0].token_ids == expected_other
    assert tight.cache.blocks.num_evictions > evictions
    assert tight.cache.num_free_blocks == 10
