"""Mamba-1's scan alone (Jamba's prefill), the token loop against the chunked form at several chunk sizes.

    OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python bench/mamba1_scan_bench.py [--device cpu|cuda] [--tokens 512]

One JSON line per (channels × state, chunk): the median of 5 runs after a warm-up, and the largest difference from
the loop's outputs. Sizes: the tiny test config (I = 128, N = 16) and Jamba-1.5's (I = 8192, N = 16).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from cluster.model.mamba import chunked_selective_scan, selective_scan


def _timed(fn, device: str) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up
    times = []
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--chunks", default="2,8,32,128")
    args = ap.parse_args()
    torch.manual_seed(0)
    n, dev = args.tokens, args.device
    for channels, state_size in [(128, 16), (8192, 16)]:
        x, dt = torch.randn(n, channels, device=dev), torch.rand(n, channels, device=dev)
        b, c = torch.randn(n, state_size, device=dev), torch.randn(n, state_size, device=dev)
        a, d = -torch.rand(channels, state_size, device=dev), torch.randn(channels, device=dev)
        s0 = torch.zeros(channels, state_size, device=dev)
        loop_s, want = _timed(lambda: selective_scan(x, dt, a, b, c, d, s0), dev)
        for chunk in [int(v) for v in args.chunks.split(",")]:
            got_s, got = _timed(lambda: chunked_selective_scan(x, dt, a, b, c, d, s0, chunk), dev)
            print(json.dumps({"device": dev, "tokens": n, "channels": channels, "state": state_size, "chunk": chunk,
                              "loop_ms": round(loop_s * 1e3, 2), "chunked_ms": round(got_s * 1e3, 2),
                              "speedup": round(loop_s / got_s, 2),
                              "max_diff": float((got - want).abs().max())}), flush=True)


if __name__ == "__main__":
    main()
