"""The plot of bench/tier_bench.py (--plot PATH): per run, tokens per simulated second and the inter-token
p99 over time for each placement, the phase boundaries dashed and the online step's switches ticked.
matplotlib is needed for it only (`.venv/bin/pip install matplotlib`; not a serving dependency)."""
from __future__ import annotations

from typing import Mapping

import numpy as np

P99_BUCKET_S = 2.0  # the p99 needs a few dozen gaps per point


def _per_bucket(gaps: list, total_s: float, bucket_s: float, fn) -> tuple[np.ndarray, np.ndarray]:
    """(bucket centres, fn(gaps in the bucket)) over [0, total_s); buckets with no gap are NaN."""
    edges = np.arange(0.0, total_s + bucket_s, bucket_s)
    times = np.array([t for t, _ in gaps]) if gaps else np.zeros(0)
    values = np.array([g for _, g in gaps]) if gaps else np.zeros(0)
    out = [fn(values[(times >= a) & (times < b)]) for a, b in zip(edges[:-1], edges[1:])]
    return edges[:-1] + bucket_s / 2, np.array(out, dtype=float)


def plot(panels: Mapping[str, Mapping[str, object]], phases, path: str) -> None:
    """panels: a title → {mode → tier_bench Result}; phases: [(domain, seconds)]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    total = sum(s for _, s in phases)
    fig, axes = plt.subplots(len(panels), 2, figsize=(12, 3.2 * len(panels)), squeeze=False)
    for row, (title, runs) in zip(axes, panels.items()):
        for mode, res in runs.items():
            x, rate = _per_bucket(res.gaps, total, 1.0, lambda v: float(len(v)))
            row[0].plot(x, rate, label=mode, lw=1)
            x, p99 = _per_bucket(res.gaps, total, P99_BUCKET_S,
                                 lambda v: 1000 * float(np.quantile(v, 0.99)) if len(v) > 1 else np.nan)
            row[1].plot(x, p99, label=mode, lw=1, marker=".")
        for ax in row:
            edge = 0.0
            for domain, seconds in phases:
                ax.axvline(edge, color="grey", ls="--", lw=0.6)
                ax.text(edge + 0.3, 1.0, domain, transform=ax.get_xaxis_transform(), va="top", fontsize=8)
                edge += seconds
            switches = runs.get("online").switches if "online" in runs else []
            ax.plot([b for _, b in switches], [0] * len(switches), "|", color="black", ms=8,
                    transform=ax.get_xaxis_transform(), label="online switch" if ax is row[0] else None)
            ax.set_xlabel("simulated s")
        row[0].set_ylabel("tokens per s")
        row[1].set_ylabel(f"inter-token p99 ms ({P99_BUCKET_S:g} s windows)")
        row[1].set_yscale("log")
        row[0].set_title(title, fontsize=9, loc="left")
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
