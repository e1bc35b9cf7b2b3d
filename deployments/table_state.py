"""The controller's side of the table-version protocol.

    controller: publish(table v+1)         routers: report(version they route by) every interval
                   │                                 │ reply carries v+1 → switch at the next step boundary
                   └── wait_switched(v+1) ◀──────────┘ next report says v+1: nothing of v is in flight there

Old copies are retired only after `wait_switched` returned True: every live
router routes by v+1. Routers report the version they *apply*, which they only
change between steps, so the acknowledgement is exact (no drain timer). A router
counts from the moment it takes its first table (`handed_out`), before its first
report; one silent for ROUTER_TIMEOUT_S is no longer waited for.

A restarted controller starts from the initial table while routers may route by
a newer one (and versions of the old incarnation must never be reused): it is
*confirmed* only once CONFIRM_GRACE_S have passed since it started and no live
router reports a version newer than its own (it asks for their tables and
restores the newest). Nothing changes the table, and no new router gets one,
before that.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from cluster.placement import Table

ROUTER_TIMEOUT_S = 5.0
CONFIRM_GRACE_S = 3.0  # > two report intervals: a router ahead of us has reported and sent its table


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
        self._started = time.monotonic()
        self.restored = False  # True once the table came from a router after a controller restart

    def publish(self, table: Table) -> None:
        if self.table is not None and table.version <= self.table.version:
            raise ValueError(f"table v{table.version} is not newer than v{self.table.version}")
        self.table = table

    def seen(self, router_id: str, version: int, node_id: str = "", stats: dict | None = None) -> None:
        self.routers[router_id] = RouterSeen(version, node_id, time.monotonic(), stats or {})
        self._changed.set()

    def handed_out(self, router_id: str) -> Table | None:
        """A new router takes its first table: from now on it is waited for like the others."""
        self.seen(router_id, self.table.version if self.table else -1)
        return self.table

    def live_routers(self, within_s: float | None = None) -> dict[str, RouterSeen]:
        """Routers heard from within `within_s` (default ROUTER_TIMEOUT_S)."""
        now, within_s = time.monotonic(), ROUTER_TIMEOUT_S if within_s is None else within_s
        return {r: s for r, s in self.routers.items() if now - s.last_seen < within_s}

    def forget_gone(self) -> None:
        now = time.monotonic()
        for router in [r for r, s in self.routers.items() if now - s.last_seen >= 10 * ROUTER_TIMEOUT_S]:
            del self.routers[router]

    @property
    def confirmed(self) -> bool:
        if self.table is None:
            return True
        if time.monotonic() - self._started < CONFIRM_GRACE_S:
            return False
        return all(s.version <= self.table.version for s in self.live_routers().values())

    async def wait_confirmed(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.confirmed:
            if time.monotonic() > deadline:
                raise TimeoutError("placement table not confirmed by the routers")
            await asyncio.sleep(0.1)

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
