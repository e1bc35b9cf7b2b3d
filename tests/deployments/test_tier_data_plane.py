"""Expert tiers on the data plane without Ray (issue 23): standalone worker processes holding a tier
placement (one fast worker with room for 3 experts, two host workers with two copies of every
other expert), a router's RemoteExperts weighing copies by tier. Greedy output is identical to the
in-process engine, rows reach both tiers, and a worker of each tier killed mid-generation loses no
request (every expert has a second copy)."""
import functools
from dataclasses import replace

import numpy as np

from cluster.engine import LLMEngine
from cluster.loader import open_model
from cluster.placement import Table
from cluster.tiers import FAST, HOST, TierWorker, fast_sets, tier_placement
from deployments.experts.remote import RemoteExperts
from tests.deployments.test_data_plane import PARAMS, PROMPTS, _expected, connect, workers  # noqa: F401
from tests.deployments.standalone import worker_ref


def test_tiers_identical_output_and_a_killed_worker_of_each_tier(checkpoint_factory, workers):  # noqa: F811
    model = str(checkpoint_factory("mixtral"))
    _, _, cfg = open_model(model)
    layers = list(cfg.moe_layer_ids)
    tiers = [TierWorker(FAST, 3), TierWorker(HOST, 64), TierWorker(HOST, 64)]
    placement = tier_placement(fast_sets(np.ones((len(layers), cfg.num_experts)), 3), layers, cfg.num_experts,
                               tiers, 1, host_copies=2)
    assert all(len(ws) >= 2 for ws in placement.copies().values())  # a second copy of every expert
    procs = workers(model, placement.workers)
    refs = tuple(replace(worker_ref(p), tier=t.tier) for p, t in zip(procs, tiers))
    remote = RemoteExperts(Table(1, placement, refs), functools.partial(connect, kind="grpc"))
    engine = LLMEngine.from_pretrained(model, experts=remote, max_num_seqs=8, max_model_len=128)
    expected = _expected(model)
    assert [o.token_ids for o in engine.generate(PROMPTS, PARAMS)] == expected
    rows = remote.stats.snapshot()["rows_per_tier"]
    assert rows[FAST] > 0 and rows[HOST] > 0
    for victim in (0, 1):  # the fast worker, then a host worker
        ids = [engine.add_request(p, PARAMS) for p in PROMPTS]
        seqs = {rid: engine.scheduler.find(rid) for rid in ids}
        for _ in range(2):
            engine.step()
        procs[victim].kill()
        procs[victim].wait()
        while engine.has_unfinished():
            engine.step()
        assert [seqs[rid].output_ids for rid in ids] == expected
    assert remote.stats.failovers > 0 and sorted(w for w, _ in remote.down_workers()) == [0, 1]
