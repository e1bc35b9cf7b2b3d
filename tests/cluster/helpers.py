"""Helpers the engine and model tests share (tests import helpers and conftest, never each other)."""
from __future__ import annotations

import torch

from cluster.engine import SamplingParams
from cluster.model.experts import Done, LocalExperts

# -- the published-config comparisons (test_published, test_dsa): our engine against transformers
STEPS = 16
PROMPT = [5, 17, 33, 2, 90, 41, 7, 11, 64, 3]
TOLERANCE = 1e-4

# -- overlap (test_overlap, tests/deployments/test_overlap_remote, test_cuda)
# 8 requests of different prompt and output lengths through 4 slots: prefills and decodes mix,
# sequences join and leave, steps have 1 to 4 sequences.
PROMPTS = [[(7 * i + j) % 120 + 1 for j in range(n)] for i, n in enumerate([1, 3, 9, 17, 30, 4, 55, 2])]
PARAMS = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (5, 12, 3, 9, 12, 7, 10, 6)]


class Recorder:
    """In-process experts that compute only when the result is asked for (as remote ones return
    from submit at once); records what the model submits and when it waits."""

    def __init__(self, local: LocalExperts):
        self.local, self.events = local, []

    def begin_step(self) -> None:
        self.events.append(("step",))

    def submit(self, layer, rows, counts):
        self.events.append(("submit", layer, rows.shape[0]))
        return Later(self, layer, rows, list(counts))

    def run(self, layer, rows, counts):
        return self.submit(layer, rows, counts).result()


class Later:
    def __init__(self, recorder: Recorder, layer, rows, counts):
        self.recorder, self.args = recorder, (layer, rows, counts)

    def result(self):
        layer, rows, _ = self.args
        self.recorder.events.append(("result", layer, rows.shape[0]))
        return self.recorder.local.run(*self.args)


# -- experts split over workers (test_expert_workers, test_published)
class Workers:
    """Each expert's rows go to the worker holding it (what deployments' RemoteExperts does over gRPC)."""

    def __init__(self, workers: list[LocalExperts]):
        self.workers = workers

    def begin_step(self) -> None:
        pass

    def submit(self, layer: int, rows: torch.Tensor, counts) -> Done:
        return Done(self.run(layer, rows, counts))

    def run(self, layer: int, rows: torch.Tensor, counts) -> torch.Tensor:
        out, start = torch.empty_like(rows), 0
        for expert_id, n in enumerate(counts):
            if n:
                worker = next(w for w in self.workers if w.holds(layer, expert_id))
                out[start:start + n] = worker.run_subset(layer, rows[start:start + n], [expert_id], [n])
                start += n
        return out


def preempted_and_chunked_equal_roomy(path: str, delta_rule=None) -> None:
    """A hybrid model on a budget of 3 state slots and 8 blocks of 4 tokens, for 4 requests of up to 26 tokens:
    sequences are preempted (their state freed) and recomputed, prompts prefilled 8 tokens a step beside
    running decodes, each step run as two micro-batches (the overlap's split carries the state slots); greedy
    and seeded outputs (tokens, and logits within TOLERANCE) equal one roomy engine's whole-prompt ones, and every
    slot and block comes back.
    delta_rule: the tight engine's gated DeltaNet kernels (None: torch, as the roomy one's)."""
    from cluster.engine import LLMEngine
    from cluster.model.kv_cache import kv_bytes_per_token
    from cluster.model.state_cache import state_bytes_per_seq
    from cluster.model.transformer import MoETransformer
    from tests.helpers import run_recording_logits

    roomy = LLMEngine.from_pretrained(path, dtype="float32", max_num_seqs=4, max_model_len=128,
                                      enable_chunked_prefill=False)
    cfg = roomy.cfg
    per_block, per_seq = kv_bytes_per_token(cfg, torch.float32) * 4, state_bytes_per_seq(cfg, torch.float32)
    split = MoETransformer(cfg, roomy.model.weights, roomy.model.experts, 128, overlap=True,
                           delta_rule=delta_rule or roomy.model.delta_rule)
    tight = LLMEngine(cfg, split, roomy.tokenizer, max_num_seqs=4, max_model_len=128, block_size=4,
                      max_num_batched_tokens=8, kv_cache_memory_bytes=3 * per_seq + 8 * per_block)
    assert tight.cache.states.num_slots == 3 and tight.cache.num_blocks == 8
    prompts = [[(5 * i + 1) % 250 for i in range(20)], [100], [(3 * i + 7) % 250 for i in range(14)], [9, 8, 7, 6]]
    params = [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=6, temperature=0.8, seed=3, ignore_eos=True)] * 2
    expected, expected_logits = run_recording_logits(roomy, prompts, params)
    tokens, logits = run_recording_logits(tight, prompts, params)
    assert tokens == expected
    # the logits too: a state a little off (stale, another sequence's) can leave the tokens as they were
    for got, want in zip(logits, expected_logits):
        torch.testing.assert_close(torch.stack(got), torch.stack(want), atol=TOLERANCE, rtol=0)
    assert tight.scheduler.num_preemptions > 0
    assert tight.cache.states.num_free == 3 and tight.cache.num_free_blocks == 8  # all given back
