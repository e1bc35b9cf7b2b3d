"""A worker's expert compute behind every transport: validate, run the held copies, count busy time.

Shapes: N rows of R values (ModelConfig.expert_row_size: D hidden, or a latent size). Every server (gRPC,
shared memory, CUDA IPC) hands its request's plain fields to `check` before touching the rows, then `run`s them; so
the rules and the load figures are the same whatever carried the call.
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Sequence

import torch
from torch import Tensor

from cluster.config import ModelConfig
from cluster.model.experts import LocalExperts
from deployments.experts.validate import NotHeld, check_forward


class ExpertCompute:
    """`service_time_per_token_s` > 0 makes the worker behave like a device of fixed capacity
    (benchmarks and fault tests only): calls run one at a time and each takes at least that
    long per row, so a worker's time grows with its load even on a machine whose cores are
    all shared."""

    def __init__(self, name: str, cfg: ModelConfig, experts: LocalExperts, device: str,
                 service_time_per_token_s: float = 0.0):
        self.name, self.cfg, self.experts, self.device = name, cfg, experts, device
        self.service_time_per_token_s = service_time_per_token_s
        self.busy_s = 0.0  # time spent computing: the worker's load, for pool autoscaling
        self._busy_lock = threading.Lock()  # calls run on several server threads
        self._device_lock = threading.Lock()

    def check(self, *, layer: int, shape: Sequence[int], dtype: str, nbytes: int,
              expert_ids: Sequence[int], counts: Sequence[int]) -> None:
        """BadRequest (malformed) or NotHeld (no copy here); nothing is computed before this passes."""
        check_forward(self.cfg, layer=layer, shape=shape, dtype=dtype, nbytes=nbytes, expert_ids=expert_ids,
                      counts=counts)
        missing = sorted({e for e in expert_ids if not self.experts.holds(layer, e)})
        if missing:
            raise NotHeld(f"holds no copy of layer {layer} expert(s) {missing}")

    def run(self, layer: int, rows: Tensor, expert_ids: Sequence[int], counts: Sequence[int]) -> Tensor:
        """Outputs [N, D] in the rows' dtype, on this worker's device."""
        rows = rows.to(self.device)
        modelled = self.service_time_per_token_s > 0
        with self._device_lock if modelled else contextlib.nullcontext():  # modelled: one call at a time
            t0 = time.perf_counter()
            out = self.experts.run_subset(layer, rows, expert_ids, counts)
            if self.device.startswith("cuda"):  # the kernels were only queued: busy time is theirs, not the launches'
                torch.cuda.current_stream(torch.device(self.device)).synchronize()
            if modelled:
                time.sleep(max(0.0, self.service_time_per_token_s * len(rows) - (time.perf_counter() - t0)))
        with self._busy_lock:
            self.busy_s += time.perf_counter() - t0
        return out
