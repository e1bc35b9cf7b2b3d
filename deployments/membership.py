"""Which expert workers exist and where, and bringing failed ones back (the controller's job).

Fixed workers are Serve deployments, one per initial-table entry: when one dies,
Serve starts a replacement (new address, empty or with its original copies) and
the deployment handle finds it. Pool workers register themselves by address.
Healing a worker = find it again, wait until its data plane answers, have it
load the copies the table gives it, and publish its ref with a new generation
(routers then use it again). Control calls (loading copies, retiring, health)
go over the same authenticated data plane as the routers' Forward calls.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Callable

from cluster.placement import Expert, WorkerRef
from deployments.experts.transport.grpc import GrpcTransport

log = logging.getLogger("ray.serve")
HEAL_TIMEOUT_S = 600.0


class Membership:
    def __init__(self, fixed_handles: list, secret: str,
                 connect: Callable[[str, str], GrpcTransport] = GrpcTransport):
        self.fixed = list(fixed_handles)
        self.secret, self.connect = secret, connect
        self._transports: dict[str, GrpcTransport] = {}

    async def fixed_refs(self, limit_s: float = 600.0) -> tuple[WorkerRef, ...]:
        """Where the fixed workers are now. During a rolling update a handle may still reach a replica
        of the previous version: an address counts only once its data plane accepts this
        application's secret (a new version has a new one)."""
        return tuple([await self._verified(w, limit_s) for w in range(len(self.fixed))])

    async def _verified(self, worker: int, limit_s: float) -> WorkerRef:
        deadline = time.monotonic() + limit_s
        while True:
            ref = WorkerRef("")
            try:  # a worker still loading its experts may take long to answer at all
                ref = await self._locate(worker, ref)
                await self.holds(ref)
                return ref
            except Exception as e:  # noqa: BLE001 - an old replica (wrong secret) or not serving yet
                self.forget(ref.address)  # nothing to close for "" (not located yet)
                if time.monotonic() > deadline:
                    raise RuntimeError(f"expert worker {worker} did not answer within {limit_s:g} s: {e}") from None
                await asyncio.sleep(0.2)

    def transport(self, address: str) -> GrpcTransport:
        if address not in self._transports:
            self._transports[address] = self.connect(address, self.secret)
        return self._transports[address]

    def forget(self, address: str) -> None:
        transport = self._transports.pop(address, None)
        if transport is not None:
            transport.close()

    async def load_copies(self, ref: WorkerRef, experts: list[Expert]) -> int:
        """Blocking on the worker (it keeps serving meanwhile); bytes read."""
        if not experts:
            return 0
        return await asyncio.to_thread(self.transport(ref.address).load_copies, experts)

    async def retire(self, ref: WorkerRef, experts: list[Expert]) -> None:
        if experts and not ref.retired:
            await asyncio.to_thread(self.transport(ref.address).retire, experts)

    async def holds(self, ref: WorkerRef) -> list[Expert]:
        return await asyncio.to_thread(self.transport(ref.address).health)

    async def _locate(self, worker: int, ref: WorkerRef) -> WorkerRef:
        if worker < len(self.fixed):  # Serve may have replaced it: ask the deployment
            handle = self.fixed[worker]
            # One call: the address and the Unix socket must come from the same replica.
            endpoints = await asyncio.wait_for(handle.get_endpoints.remote(), 30)
            if endpoints["address"] != ref.address:
                self.forget(ref.address)
            return WorkerRef(generation=ref.generation, **endpoints)
        return ref  # a pool worker keeps its address; if it is gone, Serve replaces it as a new member

    async def heal(self, worker: int, ref: WorkerRef, experts: list[Expert],
                   stop: Callable[[], bool] = lambda: False) -> WorkerRef | None:
        """Bounded: the worker's new ref (generation + 1) once it answers and holds `experts`;
        None if it did not come back within HEAL_TIMEOUT_S (or `stop()` turned true)."""
        deadline = time.monotonic() + HEAL_TIMEOUT_S
        while time.monotonic() < deadline and not stop():
            try:
                found = await self._locate(worker, ref)
                held = await self.holds(found)  # answers at all
                await self.load_copies(found, experts)  # loads only what it lacks
                await self.retire(found, sorted(set(held) - set(experts)))  # a replacement's stale copies
                log.warning("expert worker %d is back at %s", worker, found.address)
                return replace(found, generation=ref.generation + 1, retired=ref.retired)
            except Exception as e:  # noqa: BLE001 - not back yet (dead actor, refused connection, ...)
                log.info("expert worker %d not back yet: %s", worker, type(e).__name__)
                await asyncio.sleep(0.5)
        return None
