"""Data-plane figures a router keeps: time per phase, calls per worker, failures and failovers."""
from __future__ import annotations

import threading


def error_code(error: Exception) -> str:
    """The status named as gRPC names it, whatever the transport: a call past its deadline is
    DEADLINE_EXCEEDED on every transport, a same-node error reply has its status; else the
    exception's type (ConnectionError: the worker is gone)."""
    code = getattr(error, "code", None)
    if callable(code):
        return code().name
    if isinstance(error, TimeoutError):
        return "DEADLINE_EXCEEDED"
    return getattr(error, "status", None) or type(error).__name__


class DataPlaneStats:
    """Cumulative, for the step-time breakdown and /admin/stats (written from the engine thread)."""

    def __init__(self):
        self.lock = threading.Lock()
        # submit_s: picking each worker's rows and queuing its call on the pool (the bytes go out there);
        # wait_s: blocked on the replies (the transport both ways and the workers' compute).
        self.times = {"submit_s": 0.0, "wait_s": 0.0, "calls": 0}
        self.failovers = 0
        self.failures: dict[str, int] = {}  # error code -> failed expert calls
        self.calls_per_worker: dict[int, int] = {}
        self.rows_per_tier: dict[str, int] = {}  # expert rows (token, expert pairs) sent to each tier

    def record_layer(self, submit_s: float, wait_s: float, workers: list[int]) -> None:
        with self.lock:
            self.times["submit_s"] += submit_s
            self.times["wait_s"] += wait_s
            self.times["calls"] += len(workers)
            for w in workers:
                self.calls_per_worker[w] = self.calls_per_worker.get(w, 0) + 1

    def record_tiers(self, rows: dict[str, int]) -> None:
        with self.lock:
            for tier, n in rows.items():
                self.rows_per_tier[tier] = self.rows_per_tier.get(tier, 0) + n

    def failed(self, code: str) -> None:
        with self.lock:
            self.failures[code] = self.failures.get(code, 0) + 1

    def failover(self) -> None:
        with self.lock:
            self.failovers += 1

    def snapshot(self) -> dict:
        with self.lock:
            return {**self.times, "failovers": self.failovers, "failures": dict(self.failures),
                    "calls_per_worker": {str(w): n for w, n in sorted(self.calls_per_worker.items())},
                    "rows_per_tier": dict(self.rows_per_tier)}
