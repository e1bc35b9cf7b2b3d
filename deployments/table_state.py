"""The controller's side of the table-version protocol.

    controller: publish(table v+1)         routers: report(version they route by) every interval
                   │                                 │ reply carries v+1 → switch at the next step boundary
                   └── wait_switched(v+1) ◀──────────┘ next report says v+1: nothing of v is in flight there

Old copies are retired only after `wait_switched` returned True: every live
router routes by v+1 (a router that stopped reporting for ROUTER_TIMEOUT_S is
no longer waited for). Routers report the version they *apply*, which they only
change between steps, so the acknowledgement is exact (no drain timer).
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from cluster.placement import Table

ROUTER_TIMEOUT_S = 5.0


@dataclass
class RouterSeen:
    version: int
    node_id: str
    last_seen: float
    stats: dict


class TableState:
    def __init__(self, table: Table | None):
        self.table = table
        self.routers: dict[str, RouterSeen] = {}
        self._changed = asyncio.Event()
        self.restored = False  # True once the table came from a router after a controller restart

    def publish(self, table: Table) -> None:
        if self.table is not None and table.version <= self.table.version:
            raise ValueError(f"table v{table.version} is not newer than v{self.table.version}")
        self.table = table

    def seen(self, router_id: str, version: int, node_id: str, stats: dict) -> None:
        self.routers[router_id] = RouterSeen(version, node_id, time.monotonic(), stats)
        self._changed.set()

    def live_routers(self) -> dict[str, RouterSeen]:
        now = time.monotonic()
        return {r: s for r, s in self.routers.items() if now - s.last_seen < ROUTER_TIMEOUT_S}

    def forget_gone(self) -> None:
        now = time.monotonic()
        for router in [r for r, s in self.routers.items() if now - s.last_seen >= 10 * ROUTER_TIMEOUT_S]:
            del self.routers[router]

    def switched(self, version: int) -> bool:
        live = self.live_routers()
        return bool(live) and all(s.version >= version for s in live.values())

    async def wait_switched(self, version: int, timeout_s: float) -> bool:
        """True once every live router routes by `version` or newer; False at the deadline."""
        deadline = time.monotonic() + timeout_s
        while not self.switched(version):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))
            except asyncio.TimeoutError:
                pass
        return True

    def restore_from(self, table: Table) -> bool:
        """After a controller restart: the newest table any router reports is the truth."""
        if self.table is None or table.version > self.table.version:
            self.table, self.restored = table, True
            return True
        return False
