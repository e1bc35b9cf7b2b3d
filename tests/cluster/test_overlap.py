"""Overlap: a step's sequences as two micro-batches in ping-pong through the layers. The output is
the unsplit forward's (greedy tokens identical, logits equal to rounding) for concurrent requests
of different lengths, and one micro-batch's expert rows are in flight while the other runs."""
import pytest
import torch

from cluster.engine import LLMEngine, SamplingParams
from cluster.model.batch import make_batch, split_batch
from cluster.model.overlap import balanced_cut
from tests.cluster.helpers import PARAMS, PROMPTS, Recorder
from tests.helpers import run_recording_logits

def _engine(path, **kw):
    return LLMEngine.from_pretrained(path, max_num_seqs=4, max_model_len=128, **kw)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3", "qwen2_moe"])
def test_overlap_gives_the_unsplit_output(checkpoint_factory, family):
    path = str(checkpoint_factory(family))
    plain = _engine(path, overlap=False)
    tokens, logits = run_recording_logits(plain, PROMPTS, PARAMS)
    forced = _engine(path, overlap=True)  # in-process experts, split anyway
    deferred = _engine(path, experts=Recorder(plain.model.experts), overlap=True)  # rows in flight for real
    assert not plain.model.overlap and forced.model.overlap and deferred.model.overlap
    for engine in (forced, deferred):
        got_tokens, got_logits = run_recording_logits(engine, PROMPTS, PARAMS)
        assert got_tokens == tokens
        worst = max((a - b).abs().max().item() for x, y in zip(logits, got_logits) for a, b in zip(x, y))
        assert worst < 1e-5, worst


def test_auto_is_off_for_in_process_experts_and_on_a_cpu_router(checkpoint_factory):
    """Auto turns overlap on only for remote experts on a GPU router (tests/cluster/test_cuda.py):
    on a CPU the split costs more backbone time than it hides (docs/benchmarks.md)."""
    path = str(checkpoint_factory("mixtral"))
    assert not _engine(path).model.overlap
    assert not _engine(path, experts=Recorder(_engine(path).model.experts)).model.overlap


def test_micro_batches_ping_pong(checkpoint_factory):
    """Per layer: A submits, B submits, and A waits for its rows only after B's submit (B's attention
    and gating ran while A's rows were out); each micro-batch holds whole sequences."""
    path = str(checkpoint_factory("mixtral"))
    recorder = Recorder(_engine(path).model.experts)
    engine = _engine(path, experts=recorder, overlap=True)
    engine.generate([[5, 6, 7], [8, 9], [10], [11, 12, 13, 14]], SamplingParams(max_tokens=3, ignore_eos=True))
    rows, layers = 2 * engine.cfg.top_k, engine.cfg.num_layers  # last step: 4 decodes, 2 per micro-batch
    expected = [("submit", 0, rows)] * 2
    for layer in range(1, layers):
        expected += [("result", layer - 1, rows), ("submit", layer, rows)] * 2
    expected += [("result", layers - 1, rows)] * 2
    last_step = max(i for i, e in enumerate(recorder.events) if e == ("step",))
    assert recorder.events[last_step + 1:] == expected


def test_split_batch_keeps_each_sequence_whole():
    table = list(range(8))
    items = [(table, [1, 2, 3, 4, 5], 0), (table, [6], 9), (table, [7], 20), (table, [8, 9], 3), (table, [10], 40)]
    batch = make_batch(items, block_size=16)
    cut = balanced_cut(batch)
    assert cut == 1  # 5 tokens | 5 tokens
    a, b = split_batch(batch, cut)
    assert a.token_ids.tolist() == [1, 2, 3, 4, 5] and b.token_ids.tolist() == [6, 7, 8, 9, 10]
    assert a.decode is None and b.last_rows.tolist() == [0, 1, 3, 4]
    assert b.decode.rows.tolist() == [0, 1, 4] and b.decode.lens.tolist() == [10, 21, 41]
    assert b.decode.context_slots.shape == (3, 41)
    assert [c.start for c in b.chunks] == [0, 1, 2, 4]
    assert torch.equal(torch.cat([a.slot_mapping, b.slot_mapping]), batch.slot_mapping)
    a2, b2 = split_batch(batch, 3)
    assert a2.decode.context_slots.shape == (2, 21) and b2.decode.rows.tolist() == [2]
