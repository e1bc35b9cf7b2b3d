"""What the ingress replicas and the controller tell each other every half second.

Each ingress replica reports its requests in flight and its metric figures
(deployments/metrics.py: `/metrics` shows them summed); it learns the cluster's
readiness and the shutdown state (draining: refuse new requests; cut off: end the
ones still running). Kept by the controller, which every replica reaches.
"""
from __future__ import annotations

import time

from cluster.placement import Table
from deployments.metrics import IngressFigures

INGRESS_TIMEOUT_S = 5.0


class IngressBoard:
    def __init__(self):
        self.in_flight_by: dict[str, tuple[float, int]] = {}  # replica -> (last seen, requests in flight)
        # (replica, process) -> its newest figures; never dropped: a gone replica's counts stay in the sums
        self.figures_by: dict[tuple[str, str], IngressFigures] = {}
        self.draining = False
        self.cut_off = False

    def report(self, replica: str, in_flight: int, figures: IngressFigures | None = None) -> None:
        self.in_flight_by[replica] = (time.monotonic(), in_flight)
        self.report_figures(replica, figures)

    def report_figures(self, replica: str, figures: IngressFigures | None) -> None:
        """Kept if newer than what this process sent before: counters only go up, so an older snapshot that
        arrives late must not lower the sum. None (a caller that counts nothing) changes nothing."""
        if figures is None:
            return
        key = (replica, figures.process)
        known = self.figures_by.get(key)
        if known is None or figures.seq > known.seq:
            self.figures_by[key] = figures

    def figures(self) -> list[IngressFigures]:
        return list(self.figures_by.values())

    def in_flight(self) -> int:
        now = time.monotonic()
        return sum(n for seen, n in self.in_flight_by.values() if now - seen < INGRESS_TIMEOUT_S)

    def start_drain(self) -> None:
        self.draining = True

    def cut(self) -> None:
        self.cut_off = True

    def state(self, table: Table | None, down: set[int], routers_up: int) -> dict:
        uncovered = []
        if table is not None:
            uncovered = [e for e, ws in table.placement.copies().items() if all(w in down for w in ws)]
        reason = ("draining" if self.draining else "no router is up" if not routers_up
                  else f"{len(uncovered)} expert(s) without a live copy" if uncovered else None)
        return {"ready": reason is None, "reason": reason, "draining": self.draining, "cut_off": self.cut_off}
