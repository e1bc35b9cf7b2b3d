"""Expert tiers on or off give the same greedy output, for every family (issue 23), in-process: the
router's RemoteExperts weighs copies by tier (`cluster.tier_choice`) over workers that each hold only
their own copies (LocalExperts behind a transport's `forward`), against the in-process engine. The
served form of this check, with real workers on Serve, is tests/deployments/test_tiers_served.py
(one family: it costs a cluster)."""
from cluster.engine import LLMEngine, SamplingParams
from cluster.loader import load_experts, open_model
from cluster.model.experts import LocalExperts
from cluster.placement import Table, WorkerRef
from cluster.tiers import FAST, HOST, TierWorker, tier_placement, uniform_sets
from deployments.experts.remote import RemoteExperts

PARAMS = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
PROMPTS = [[5, 17, 33], list(range(3, 60, 2)), [7, 7, 7, 7, 8]]  # a long prompt: many rows per expert


class InProcess:
    """A transport whose worker is this process: `forward` runs the worker's own copies."""

    def __init__(self, experts: LocalExperts):
        self.experts = experts

    def forward(self, layer, rows, expert_ids, counts, timeout_s):
        return self.experts.run_subset(layer, rows, expert_ids, counts)

    def close(self) -> None:
        pass


def test_tiers_on_and_off_give_the_same_greedy_output(family_checkpoint):
    family, path = family_checkpoint
    ckpt, fam, cfg = open_model(str(path))
    layers = list(cfg.moe_layer_ids)
    # a fast worker with room for 3 copies, two host workers holding every expert (the fast ones too)
    tiers = [TierWorker(FAST, 3), TierWorker(HOST, 1 << 20), TierWorker(HOST, 1 << 20)]
    placement = tier_placement(uniform_sets(len(layers), cfg.num_experts, 3), layers, cfg.num_experts, tiers, 1)
    refs = tuple(WorkerRef(f"w{i}:1", tier=t.tier) for i, t in enumerate(tiers))
    workers = {ref.address: InProcess(LocalExperts(load_experts(open_model(str(path))[0], fam, cfg, list(held))))
               for ref, held in zip(refs, placement.workers)}
    remote = RemoteExperts(Table(1, placement, refs), lambda ref: workers[ref.address])
    try:
        tiered = LLMEngine.from_pretrained(str(path), experts=remote, max_num_seqs=4, max_model_len=128)
        got = [o.token_ids for o in tiered.generate(PROMPTS, PARAMS)]
    finally:
        remote.close()
    expected = [o.token_ids for o in LLMEngine.from_pretrained(str(path), max_model_len=128).generate(PROMPTS, PARAMS)]
    assert got == expected, family
    rows = remote.stats.snapshot()["rows_per_tier"]
    assert rows.get(FAST, 0) > 0 and rows.get(HOST, 0) > 0, rows  # both tiers served rows
