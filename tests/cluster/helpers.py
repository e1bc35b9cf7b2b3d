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
