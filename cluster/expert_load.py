"""Expert load accounting: tokens per (layer, expert_id), smoothed, and co-activation counts.

Pure bookkeeping fed by the router's routing decisions each step.
Shapes: L MoE layers, E experts, T tokens, K top-k.
"""
from __future__ import annotations

import threading

import torch

from cluster.model.moe import Routing


class ExpertLoadTracker:
    """EMA of tokens per (layer, expert) per step, plus cumulative totals and co-activation.

    `alpha` weighs the newest step (alpha = 2 / (window + 1) approximates a window
    of `window` steps). Co-activation counts, per layer, how often two experts are
    chosen for the same token: [L, E, E], built from one-hot products (cheap).
    """

    def __init__(self, moe_layers: tuple[int, ...], num_experts: int, alpha: float = 0.1):
        self.moe_layers, self.num_experts, self.alpha = moe_layers, num_experts, alpha
        shape = (len(moe_layers), num_experts)
        self.ema = torch.zeros(shape, dtype=torch.float64)
        self.total = torch.zeros(shape, dtype=torch.int64)
        self.coactivation = torch.zeros((len(moe_layers), num_experts, num_experts), dtype=torch.int64)
        self.steps = 0
        self._lock = threading.Lock()  # the engine thread writes, admin/metrics readers read

    def record(self, routing: list[Routing]) -> None:
        if not routing:
            return
        ids = torch.stack([r.ids for r in routing]).cpu()  # [L, T, K]: one copy to the host per step
        e, layers = self.num_experts, ids.shape[0]
        layer = torch.arange(layers)[:, None, None]  # [L, 1, 1]: each layer counts in its own range
        counts = torch.bincount((ids + layer * e).reshape(-1), minlength=layers * e).view(layers, e)  # [L, E]
        pairs = self._pairs(ids, layer)  # [L, E, E]
        with self._lock:
            self.ema.mul_(1 - self.alpha).add_(counts.double(), alpha=self.alpha)
            self.total += counts
            self.coactivation += pairs
            self.steps += 1

    def _pairs(self, ids: torch.Tensor, layer: torch.Tensor) -> torch.Tensor:
        """ids [L, T, K] → [L, E, E] counts of (a, b), a != b, chosen for the same token."""
        e, k, layers = self.num_experts, ids.shape[-1], ids.shape[0]
        a = ids[..., :, None].expand(-1, -1, k, k)  # [L, T, K, K]
        b = ids[..., None, :].expand(-1, -1, k, k)
        off_diagonal = ~torch.eye(k, dtype=torch.bool)
        flat = ((layer[..., None] * e + a) * e + b)[:, :, off_diagonal].reshape(-1)
        return torch.bincount(flat, minlength=layers * e * e).view(layers, e, e)

    def set_alpha(self, alpha: float) -> None:
        with self._lock:
            self.alpha = alpha

    def report(self, co_activation: bool) -> tuple:
        """(EMA [L, E], totals [L, E], co-activation [L, E, E] or None) as numpy: what a router reports."""
        ema, totals = self.arrays()
        return ema, totals, self.coactivation_counts().numpy() if co_activation else None

    def arrays(self):
        """(EMA [L, E] float64, totals [L, E] int64) as numpy copies: cheap to send between processes."""
        with self._lock:
            return self.ema.numpy().copy(), self.total.numpy().copy()

    def snapshot(self) -> dict:
        with self._lock:
            ema = self.ema.clone()
            return {"layers": list(self.moe_layers), "steps": self.steps, "ema_tokens_per_step": ema.tolist(),
                    "total_tokens": self.total.tolist(), "max_over_mean": max_over_mean(ema).tolist()}

    def coactivation_counts(self) -> "torch.Tensor":
        """[L, E, E] co-activation counts so far (a copy)."""
        with self._lock:
            return self.coactivation.clone()


def max_over_mean(loads: torch.Tensor) -> torch.Tensor:
    """[L, E] → [L]: the hottest expert's load over the mean expert load (1.0 = even)."""
    mean = loads.mean(-1)
    return torch.where(mean > 0, loads.max(-1).values / mean.clamp_min(1e-12), torch.ones_like(mean))
