"""Overlap with real expert workers (standalone processes, RemoteExperts over gRPC): the same greedy
output as the in-process engine with and without the two micro-batches, and a worker killed during
overlapped decoding loses no request when a second copy exists."""
import functools

import pytest

from cluster.engine import LLMEngine
from cluster.loader import open_model
from cluster.placement import Placement, Table
from deployments.experts.remote import RemoteExperts
from tests.cluster.helpers import PARAMS, PROMPTS
from tests.deployments.helpers import KINDS, connect, worker_ref


def _every_expert_twice(model: str) -> Placement:
    _, _, cfg = open_model(model)
    return Placement((tuple(cfg.experts()), tuple(cfg.experts())))


def _remote_engine(model: str, placement: Placement, procs, overlap: bool | None = None, kind="grpc", **kw):
    refs = tuple(worker_ref(p) for p in procs)
    remote = RemoteExperts(Table(1, placement, refs), functools.partial(connect, kind=kind), **kw)
    engine = LLMEngine.from_pretrained(model, experts=remote, max_num_seqs=4, max_model_len=128, overlap=overlap)
    return engine, remote


def _expected(model: str) -> list[list[int]]:
    return [o.token_ids for o in LLMEngine.from_pretrained(model, max_num_seqs=4).generate(PROMPTS, PARAMS)]


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_same_output_with_and_without_overlap(checkpoint_factory, workers, family, kind):
    model = str(checkpoint_factory(family))
    placement = _every_expert_twice(model)
    engine, remote = _remote_engine(model, placement, workers(model, placement.workers), overlap=True, kind=kind)
    assert all(isinstance(remote.transports.get(w, ref), KINDS[kind]) for w, ref in enumerate(remote.table.workers))
    try:
        expected = _expected(model)
        assert [o.token_ids for o in engine.generate(PROMPTS, PARAMS)] == expected
        overlapped_calls = remote.stats.snapshot()["calls"]
        engine.model.overlap = False
        assert [o.token_ids for o in engine.generate(PROMPTS, PARAMS)] == expected
        assert overlapped_calls > remote.stats.snapshot()["calls"] - overlapped_calls  # two micro-batches did run
    finally:
        remote.close()


def test_killed_worker_during_overlapped_decoding_loses_no_request(checkpoint_factory, workers):
    """Worker 1 dies right after micro-batch A of a decode step submitted its first layer: A's calls to it
    (in flight) and B's (sent after) fail over to worker 0's copies; every request completes unchanged."""
    model = str(checkpoint_factory("mixtral"))
    placement = _every_expert_twice(model)
    procs = workers(model, placement.workers)
    reported, submits = [], []
    engine, remote = _remote_engine(model, placement, procs, overlap=True,
                                    on_down=lambda w, g: reported.append((w, g)))
    submit, kill_at = remote.submit, 2 * 2 * engine.cfg.num_layers + 1  # steps 1-2: two submits per layer each

    def submit_then_kill(layer, rows, counts):
        pending = submit(layer, rows, counts)
        submits.append(layer)
        if len(submits) == kill_at:
            procs[1].kill()
            procs[1].wait()
        return pending

    remote.submit = submit_then_kill
    try:
        assert [o.token_ids for o in engine.generate(PROMPTS, PARAMS)] == _expected(model)
        assert remote.stats.failovers > 0 and reported == [(1, 0)]
    finally:
        remote.close()
