"""Without CUDA the engine runs eagerly: auto leaves CUDA graphs off, asking for them says why not."""
import pytest
import torch

from cluster.engine import LLMEngine
from cluster.model.cuda_graphs import unsupported


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_cuda_graphs_are_off_without_cuda_and_refused_when_asked(checkpoint_factory):
    path = str(checkpoint_factory("mixtral"))
    engine = LLMEngine.from_pretrained(path, max_model_len=64)
    assert engine.graphs is None and unsupported(engine.model) == "this machine has no CUDA device"
    with pytest.raises(ValueError, match="no CUDA device"):
        LLMEngine.from_pretrained(path, max_model_len=64, cuda_graphs=True)


def test_a_padded_decode_bucket_gives_the_real_rows_output(checkpoint_factory):
    """What a graph replays, run eagerly on the CPU: 3 sequences padded to a bucket of 4 by repeating
    the last one, contexts padded to 64 slots, each path with its own KV cache, teacher-forced."""
    from cluster.model.batch import make_batch
    from cluster.model.cuda_graphs import DecodeBucket
    from cluster.model.kv_cache import KVCache

    engine = LLMEngine.from_pretrained(str(checkpoint_factory("qwen3_moe")), max_model_len=128)
    model, caches = engine.model, [KVCache.for_model(engine.cfg, 16, 16) for _ in range(2)]
    prompts = [[5, 17, 33, 2], list(range(3, 40, 2)), [7]]
    tables = [list(range(4 * i, 4 * i + 4)) for i in range(len(prompts))]  # the same blocks in both caches
    for cache in caches:
        model.forward(make_batch([(t, p, 0) for t, p in zip(tables, prompts)], 16), cache)
    bucket = DecodeBucket(4, 64, torch.device("cpu"))
    lengths, last = [len(p) for p in prompts], [p[-1] for p in prompts]
    for _ in range(6):
        batch = make_batch([(t, [tok], n) for t, tok, n in zip(tables, last, lengths)], 16)
        eager, eager_routing = model.forward(batch, caches[0])
        bucket.load(batch)
        bucket.logits, bucket.routing = model.forward(bucket.batch, caches[1])
        padded, routing = bucket.outputs(len(prompts))
        torch.testing.assert_close(padded, eager, atol=1e-5, rtol=1e-5)
        assert all(torch.equal(a.ids, b.ids) for a, b in zip(routing, eager_routing))
        last, lengths = eager.argmax(-1).tolist(), [n + 1 for n in lengths]
