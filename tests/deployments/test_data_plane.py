"""The gRPC expert data plane without Ray: copies, token splitting, failover, placement swaps."""
import json
import subprocess
import sys
import time

import pytest

from cluster.engine import LLMEngine, SamplingParams
from cluster.loader import open_model
from cluster.placement import Placement, round_robin
from deployments.data_plane import ExpertUnavailable, RemoteExperts, _split

PARAMS = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
PROMPTS = [[5, 17, 33], [100, 3], list(range(3, 40, 2)), [7, 7, 7, 7, 8]]


@pytest.fixture
def workers(checkpoint_factory):
    """Start standalone worker processes for given slot lists; killed at the end."""
    procs = []

    def start(model: str, slot_lists, *extra: str) -> list[subprocess.Popen]:
        for slots in slot_lists:
            procs.append(subprocess.Popen([sys.executable, "-m", "deployments.standalone_worker", model,
                                           json.dumps([list(s) for s in slots]), *extra],
                                          stdout=subprocess.PIPE, text=True))
        return procs[-len(slot_lists):]

    yield start
    for p in procs:
        p.kill()
        p.wait()


def _engine(model, placement, procs, ports=None, **kw):
    ports = ports if ports is not None else []
    ports[:] = [int(p.stdout.readline()) for p in procs]
    remote = RemoteExperts(placement, lambda w, refresh=False: f"127.0.0.1:{ports[w]}", **kw)
    return LLMEngine.from_pretrained(model, experts=remote, max_num_seqs=8, max_model_len=128), remote


def test_split_is_even_and_contiguous():
    assert _split(10, 7, 3) == [(10, 3), (13, 2), (15, 2)]
    assert _split(0, 1, 2) == [(0, 1), (1, 0)]


@pytest.mark.parametrize("split", ["even", "least_loaded"])
def test_copies_share_rows_and_output_is_unchanged(checkpoint_factory, workers, split):
    model = str(checkpoint_factory("mixtral"))
    _, _, cfg = open_model(model)
    both = Placement((tuple(cfg.expert_pairs()), tuple(cfg.expert_pairs())))  # every expert twice
    expected = [o.token_ids for o in LLMEngine.from_pretrained(model).generate(PROMPTS, PARAMS)]
    engine, remote = _engine(model, both, workers(model, both.workers), token_split=split)
    assert [o.token_ids for o in engine.generate(PROMPTS, PARAMS)] == expected
    assert remote.timer.snapshot()["calls"] > 0


def test_killed_worker_with_a_second_copy_loses_no_request(checkpoint_factory, workers):
    model = str(checkpoint_factory("mixtral"))
    _, _, cfg = open_model(model)
    both = Placement((tuple(cfg.expert_pairs()), tuple(cfg.expert_pairs())))
    expected = [o.token_ids for o in LLMEngine.from_pretrained(model).generate(PROMPTS, PARAMS)]
    procs = workers(model, both.workers)
    engine, remote = _engine(model, both, procs)
    ids = [engine.add_request(p, PARAMS) for p in PROMPTS]
    seqs = {rid: engine.scheduler.find(rid) for rid in ids}
    for _ in range(3):
        engine.step()
    procs[1].kill()
    procs[1].wait()
    while engine.has_unfinished():
        engine.step()
    assert [seqs[rid].output_ids for rid in ids] == expected
    assert remote.failovers > 0


def test_killed_worker_without_a_copy_fails_clearly(checkpoint_factory, workers):
    model = str(checkpoint_factory("mixtral"))
    _, _, cfg = open_model(model)
    placement = round_robin(cfg.expert_pairs(), 2)
    procs = workers(model, placement.workers)
    engine, _ = _engine(model, placement, procs)
    procs[0].kill()
    procs[0].wait()
    with pytest.raises(ExpertUnavailable, match="no other live copy answered"):
        engine.generate(PROMPTS[:1], PARAMS)
    t0 = time.monotonic()  # while it is down, new work fails at once: a clear error, not a hang
    with pytest.raises(ExpertUnavailable, match="no live copy"):
        engine.generate(PROMPTS[:1], PARAMS)
    assert time.monotonic() - t0 < 5


def test_placement_swap_mid_generation(checkpoint_factory, workers):
    model = str(checkpoint_factory("qwen2_moe"))
    _, _, cfg = open_model(model)
    one, other = round_robin(cfg.expert_pairs(), 2), Placement((tuple(cfg.expert_pairs()),) * 2)
    expected = [o.token_ids for o in LLMEngine.from_pretrained(model).generate(PROMPTS, PARAMS)]
    engine, remote = _engine(model, other, workers(model, other.workers))
    ids = [engine.add_request(p, PARAMS) for p in PROMPTS]
    seqs = {rid: engine.scheduler.find(rid) for rid in ids}
    step = 0
    while engine.has_unfinished():
        remote.swap_placement(one if step % 2 else other)
        engine.step()
        step += 1
    assert [seqs[rid].output_ids for rid in ids] == expected


def test_local_copies_are_preferred(checkpoint_factory, workers):
    model = str(checkpoint_factory("mixtral"))
    _, _, cfg = open_model(model)
    both = Placement((tuple(cfg.expert_pairs()), tuple(cfg.expert_pairs())))
    engine, remote = _engine(model, both, workers(model, both.workers), local_workers=frozenset({1}))
    engine.generate(PROMPTS, PARAMS)
    assert remote.calls_per_worker.get(0, 0) == 0 and remote.calls_per_worker[1] > 0


def test_timed_out_call_is_retried_on_another_copy(checkpoint_factory, workers):
    """Worker 0 is a 'device' far slower than the call deadline: its rows go to worker 1."""
    model = str(checkpoint_factory("mixtral"))
    _, _, cfg = open_model(model)
    both = Placement((tuple(cfg.expert_pairs()), tuple(cfg.expert_pairs())))
    expected = [o.token_ids for o in LLMEngine.from_pretrained(model).generate(PROMPTS, PARAMS)]
    slow = workers(model, both.workers[:1], "--service-time-per-token", "5")
    fast = workers(model, both.workers[1:])
    engine, remote = _engine(model, both, slow + fast, call_timeout_s=0.5)
    try:
        assert [o.token_ids for o in engine.generate(PROMPTS, PARAMS)] == expected
        assert remote.failures.get("DEADLINE_EXCEEDED", 0) >= 1 and remote.failovers >= 1
    finally:
        remote.close()


def test_replaced_worker_is_healed_back_into_service(checkpoint_factory, workers):
    model = str(checkpoint_factory("mixtral"))
    _, _, cfg = open_model(model)
    both = Placement((tuple(cfg.expert_pairs()), tuple(cfg.expert_pairs())))
    expected = [o.token_ids for o in LLMEngine.from_pretrained(model).generate(PROMPTS, PARAMS)]
    procs, ports = workers(model, both.workers), []
    engine, remote = _engine(model, both, procs, ports)
    try:
        engine.generate(PROMPTS[:1], PARAMS)
        procs[0].kill()
        procs[0].wait()
        engine.generate(PROMPTS[:1], PARAMS)  # served by worker 1 alone
        assert remote.down_workers() == [0] and remote.uncovered() == []
        # "Serve's replacement", started empty: healing must load the table's slots onto it
        ports[0] = int(workers(model, [[]])[0].stdout.readline())
        deadline = time.monotonic() + 60
        while remote.down_workers() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert remote.down_workers() == []
        before, failovers = remote.calls_per_worker.get(0, 0), remote.failovers
        assert [o.token_ids for o in engine.generate(PROMPTS, PARAMS)] == expected
        assert remote.calls_per_worker[0] > before  # back in service
        assert remote.failovers == failovers  # and it held every slot it was sent rows for
    finally:
        remote.close()


@pytest.mark.parametrize("split,expected", [
    ("even", {0: [(0, 0, 2), (1, 4, 1)], 1: [(0, 2, 2), (1, 5, 1)]}),
    ("least_loaded", {0: [(0, 0, 4)], 1: [(1, 4, 2)]}),
])
def test_token_split_rules(split, expected):
    both = Placement((((0, 0), (0, 1)), ((0, 0), (0, 1))))
    remote = RemoteExperts(both, lambda w, refresh=False: "unused:0", token_split=split)
    assert remote._groups(both.copies(), 0, [4, 2]) == expected
    remote.local_workers = frozenset({1})  # a copy on the router's node wins either way
    assert remote._groups(both.copies(), 0, [4, 2]) == {1: [(0, 0, 4), (1, 4, 2)]}
