"""A router's side of the table-version protocol (deployments/table_state.py has the controller's).

Every REPORT_INTERVAL_S (and at once when an expert worker fails) the router sends
its expert load, the version it routes by and the workers it saw fail; the reply
carries a newer table, adopted at the next step boundary, and the runtime policy
a router applies. With the controller gone, the router keeps its last table.
"""
from __future__ import annotations

import asyncio
import logging
import time

from cluster.engine.async_engine import AsyncEngine
from cluster.placement import Table
from deployments.experts.remote import RemoteExperts
from deployments.messages import AppSpec, ControllerReply, RouterReport, RouterSettings

log = logging.getLogger("ray.serve")
REPORT_INTERVAL_S = 0.5
REPORT_TIMEOUT_S = 5.0


class ControllerLink:
    def __init__(self, spec: AppSpec, controller, router_id: str, node_id: str):
        self.spec, self.controller, self.router_id, self.node_id = spec, controller, router_id, node_id
        self.engine: AsyncEngine | None = None
        self.remote: RemoteExperts | None = None
        self._loop = asyncio.get_running_loop()
        self._now = asyncio.Event()
        self._send_table = False
        self.settings = RouterSettings()  # the newest sent (by revision): a restarted controller's may be older

    async def first_table(self, limit_s: float = 600.0) -> Table:
        """From the controller of this build (a rolling update may route to the previous one first);
        the controller counts this router from here on."""
        deadline = time.monotonic() + limit_s
        while True:
            try:
                return await self.controller.current_table.remote(self.spec.build_id, self.router_id)
            except Exception as e:  # noqa: BLE001 - the other build's controller, or ours not confirmed yet
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no placement table from the controller within {limit_s:g} s") from e
                await asyncio.sleep(0.2)

    def attach(self, engine: AsyncEngine, remote: RemoteExperts | None) -> None:
        self.engine, self.remote = engine, remote

    def report_soon(self) -> None:
        """Thread-safe (the engine thread calls it when a worker fails)."""
        self._loop.call_soon_threadsafe(self._now.set)

    def _report(self) -> RouterReport:
        remote = self.remote
        # arrays, not lists: no per-element Python objects to pickle
        ema, totals, coactivation = self.engine.expert_load_report(
            self.spec.policy is not None and self.spec.policy.co_activation)
        return RouterReport(self.spec.build_id, self.router_id, self.node_id,
                            remote.table.version if remote and remote.table else -1, ema, totals, coactivation,
                            tuple(remote.down_workers()) if remote else (), self.stats(),
                            remote.table if remote and self._send_table else None, self.settings)

    def stats(self) -> dict:
        data_plane = None
        if self.remote is not None:
            data_plane = {**self.remote.stats.snapshot(), "same_node_workers": sorted(self.remote.same_node)}
        remote = self.remote
        return {"router": self.router_id, "node_id": self.node_id, **self.engine.stats(), "data_plane": data_plane,
                "table_version": remote.table.version if remote and remote.table else None}

    async def report_once(self) -> None:
        reply: ControllerReply | None = await asyncio.wait_for(self.controller.report.remote(self._report()),
                                                               REPORT_TIMEOUT_S)
        if reply is None:
            return  # the other build's controller (rolling update): ours answers the next report
        self._send_table = reply.send_table
        if reply.settings.revision >= self.settings.revision:
            self.settings = reply.settings
        if self.remote is not None:
            if reply.table is not None:
                self.remote.adopt(reply.table)
            self.remote.apply_settings(self.settings.copy_choice)
        self.engine.set_expert_load_window(self.settings.ema_alpha)

    async def run_forever(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._now.wait(), REPORT_INTERVAL_S)
            except asyncio.TimeoutError:
                pass
            self._now.clear()
            t0 = time.monotonic()
            try:
                await self.report_once()
            except Exception as e:  # noqa: BLE001 - the controller may be restarting: keep the last table
                log.info("router %s: controller unreachable (%s); keeping table", self.router_id, type(e).__name__)
                await asyncio.sleep(max(0.0, REPORT_INTERVAL_S - (time.monotonic() - t0)))
