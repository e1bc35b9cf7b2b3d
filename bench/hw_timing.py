"""Timing on real hardware for bench/tier_hw.py: a wall budget, a synced timer sized by time, and the
environment a figure was measured in. No Ray, no project imports: it only needs torch."""
from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

MATMUL_FLAGS = {"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16"}  # why bf16 is fast or not

@dataclass(frozen=True)
class Budget:
    """The run's wall budget: parts and their measurements check it between them, never inside one."""

    seconds: float
    start: float = field(default_factory=time.perf_counter)

    def used(self) -> float:
        return time.perf_counter() - self.start

    def over(self) -> bool:
        return self.used() >= self.seconds


def sync(device: torch.device) -> None:
    """Wait for the device's queued work: CUDA kernels return before they run, CPU ops after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, *, max_s: float, warmup: int = 2,
            max_reps: int = 200) -> dict:
    """ms per call of `fn` on `device`: `warmup` synced calls (the first pays for kernel choice and
    allocation), then as many as fit in `max_s` (≥ 3), the median of per-call wall times (each synced,
    so a call's queued GPU work counts in its own time). A warmed call slower than `max_s` is the only
    one measured: a slow tier must not eat the budget of the parts after it. The warm-ups' fastest
    call decides, so one call delayed by other load does not. Short GPU calls also get
    `ms_back_to_back`: queued without a sync between them, what the kernels themselves take."""
    warm = []
    for _ in range(warmup):
        warm.append(_synced(fn, device))
        if warm[-1] >= 10 * max_s:  # so slow that one-time costs do not matter: one call is the figure
            break
    if min(warm) >= max_s:
        return {"ms": round(1000 * min(warm), 4), "ms_min": round(1000 * min(warm), 4), "reps": 1}
    reps = max(3, min(max_reps, int(max_s / max(min(warm), 1e-6))))
    times = [_synced(fn, device) for _ in range(reps)]
    out = {"ms": round(1000 * statistics.median(times), 4), "ms_min": round(1000 * min(times), 4), "reps": reps}
    if device.type == "cuda" and min(warm) < 0.005:  # short GPU calls: the per-call sync is part of their time
        out["ms_back_to_back"] = round(1000 * _back_to_back(fn, device, reps), 4)
    return out


def _synced(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call, its queued device work included."""
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def _back_to_back(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Seconds per call with `reps` calls queued back to back and one sync: the GPU's time without the host's."""
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t) / reps


def cpu_threads(requested: int) -> int:
    """Set torch's CPU threads: `requested`, or every core this process may run on (0)."""
    n = requested or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    return torch.get_num_threads()


def environment(device: torch.device) -> dict:
    """What the figures were measured on, printed with them."""
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "cpu_threads": torch.get_num_threads(), "cpu_cores_visible": len(os.sched_getaffinity(0)),
           "cpu_model": _cpu_info("model name"), "grouped_mm": hasattr(torch.nn.functional, "grouped_mm"),
           "cpu_matmul_flags": sorted(set(_cpu_info("flags").split()) & MATMUL_FLAGS)}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), capability=list(torch.cuda.get_device_capability(device)),
                   cuda=torch.version.cuda)
    return env


def _cpu_info(key: str) -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(key)), "")
    except OSError:
        return platform.processor() if key == "model name" else ""
