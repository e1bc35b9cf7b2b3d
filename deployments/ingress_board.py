"""What the ingress replicas and the controller tell each other every half second.

Each ingress replica reports its requests in flight; it learns the cluster's
readiness and the shutdown state (draining: refuse new requests; cut off: end the
ones still running). Kept by the controller, which every replica reaches.
"""
from __future__ import annotations

import time

from cluster.placement import Table

INGRESS_TIMEOUT_S = 5.0


class IngressBoard:
    def __init__(self):
        self.in_flight_by: dict[str, tuple[float, int]] = {}  # replica -> (last seen, requests in flight)
        self.draining = False
        self.cut_off = False

    def report(self, replica: str, in_flight: int) -> None:
        self.in_flight_by[replica] = (time.monotonic(), in_flight)

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
