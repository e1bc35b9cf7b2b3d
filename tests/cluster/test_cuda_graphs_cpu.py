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


@pytest.mark.parametrize("max_seqs, max_len, grid", [
    (1, 8, [(1, 32)]),
    (3, 100, [(4, 128), (4, 64), (2, 128), (4, 32), (2, 64), (1, 128), (2, 32), (1, 64), (1, 32)]),
    (64, 1024, None),
])
def test_bucket_grid_covers_every_decode_step_largest_first(max_seqs, max_len, grid):
    from cluster.model.cuda_graphs import _bucket, bucket_grid

    got = bucket_grid(max_seqs, max_len)
    if grid is not None:
        assert got == grid
    assert len(got) == len(set(got)) and [b * c for b, c in got] == sorted((b * c for b, c in got), reverse=True)
    steps = {(_bucket(b), _bucket(c, least=32)) for b in range(1, max_seqs + 1) for c in range(1, max_len + 1)}
    assert steps == set(got)  # every step a bucket, no bucket no step meets


def _graphs_without_cuda(monkeypatch, engine_factory):
    """DecodeGraphs where CUDA is stubbed out: its decisions (what to capture, when to drop) run, captures
    are recorded instead of made."""
    from cluster.model import cuda_graphs

    captured = []
    monkeypatch.setattr(cuda_graphs, "unsupported", lambda model: None)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(cuda_graphs.DecodeGraphs, "_capture", lambda self, key, batch: captured.append(key) or key)
    return engine_factory(), captured


def test_the_grid_is_captured_at_start_up_bounded_by_config(checkpoint_factory, monkeypatch):
    from cluster.model.batch import make_batch
    from cluster.model.cuda_graphs import bucket_grid

    path = str(checkpoint_factory("qwen3_moe"))
    engine, captured = _graphs_without_cuda(monkeypatch, lambda: LLMEngine.from_pretrained(
        path, max_model_len=100, max_num_seqs=8, cuda_graphs=True, cuda_graph_max_seqs=3))
    assert captured == bucket_grid(3, 100) and set(engine.graphs.graphs) == set(captured)
    assert captured[0] == (4, 128)  # largest first: the smaller graphs reuse its pool
    five = make_batch([([i], [7], 3) for i in range(5)], 16)  # 5 decoding sequences: above the bound
    assert engine.graphs.run(five) is None and captured == bucket_grid(3, 100)  # eager, nothing captured


def test_restacked_experts_drop_the_captured_graphs(checkpoint_factory, monkeypatch):
    """Graphs hold the expert stacks' addresses: adding or removing in-process experts (a new stack
    version) drops them all; nothing else does."""
    path = str(checkpoint_factory("qwen3_moe"))
    engine, captured = _graphs_without_cuda(monkeypatch, lambda: LLMEngine.from_pretrained(
        path, max_model_len=32, max_num_seqs=2, cuda_graphs=True))
    graphs, experts = engine.graphs, engine.model.experts
    assert len(graphs.graphs) == 2 and not graphs.drop_if_restacked()
    version, gone = experts.version, (0, 3)
    weights = experts.experts[gone]
    experts.remove([gone])
    assert experts.version == version + 1 and graphs.drop_if_restacked() and graphs.graphs == {}
    experts.add({gone: weights})
    assert experts.version == version + 2 and graphs.drop_if_restacked() and not graphs.drop_if_restacked()
