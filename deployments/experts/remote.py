"""The router's ExpertExecutor: a layer's rows fanned out to the workers holding copies.

Shapes: N rows (sorted by expert_id), D hidden. Per layer: copy choice (a pure
rule, cluster.copy_choice) → send (one call per worker, concurrently, each with
a deadline) → receive → on failure re-send that worker's rows to other live
copies (expert compute is a pure function: a retry is safe, no request has to
fail). `submit` returns at once with the calls in flight, so the model can run
other work (the other micro-batch's attention) before it asks for the result.

A failed worker is marked down for its current generation and reported through
`on_down`; the controller heals it and publishes a table with a new generation,
which brings it back. With no live copy: ExpertUnavailable at once. Tables
switch only at step boundaries (`begin_step`), so a step uses one table.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
from torch import Tensor

from cluster.copy_choice import NoLiveCopy, choose_copies
from cluster.tier_choice import choose_tiered
from cluster.tiers import row_costs
from cluster.placement import Expert, Table, WorkerRef
from deployments.experts.stats import DataPlaneStats, error_code

log = logging.getLogger("ray.serve")


_thread = threading.local()


def on_side_stream(ready, forward: Callable[..., Tensor], *args) -> Tensor:
    """Run a transport call from the pool thread on that thread's own CUDA stream, after `ready` (an
    event the engine thread recorded once the rows existed). On the shared default stream the call's
    copies and syncs would queue behind the other micro-batch's attention, undoing the overlap."""
    if ready is None:
        return forward(*args)
    stream = getattr(_thread, "stream", None)
    if stream is None or stream.device != ready.device:
        stream = _thread.stream = torch.cuda.Stream(ready.device)
    stream.wait_event(ready)
    with torch.cuda.stream(stream):
        return forward(*args)  # each transport syncs its stream before returning device outputs


class Transport(Protocol):
    address: str

    def forward(self, layer: int, rows: Tensor, expert_ids: list[int], counts: list[int], timeout: float) -> Tensor:
        ...

    def close(self) -> None:
        ...


class ExpertUnavailable(RuntimeError):
    """No live copy of an expert could serve a layer's rows."""

    def __reduce__(self):
        return ExpertUnavailable, (str(self),)


class WorkerHealth:
    """Which workers this router saw fail, per generation (a healed worker comes back with a newer one)."""

    def __init__(self):
        self._down: dict[int, int] = {}  # worker -> generation it failed in
        self._lock = threading.Lock()

    def mark(self, worker: int, generation: int) -> bool:
        """True when this is news (not already marked for this generation)."""
        with self._lock:
            if self._down.get(worker) == generation:
                return False
            self._down[worker] = generation
            return True

    def _current(self, table: Table) -> dict[int, int]:
        """The marks still true of `table` (same worker generation); the caller holds the lock."""
        return {w: g for w, g in self._down.items() if w < len(table.workers) and table.workers[w].generation == g}

    def down(self, table: Table) -> set[int]:
        with self._lock:
            return set(self._current(table))

    def forget_healed(self, table: Table) -> None:
        with self._lock:
            self._down = self._current(table)

    def marked(self) -> list[tuple[int, int]]:
        with self._lock:
            return sorted(self._down.items())


class Transports:
    """One open transport per worker, replaced when the table gives it a new address or generation."""

    def __init__(self, connect: Callable[[WorkerRef], Transport]):
        self.connect = connect
        self._open: dict[int, tuple[WorkerRef, Transport]] = {}
        self._lock = threading.Lock()

    def get(self, worker: int, ref: WorkerRef) -> Transport:
        with self._lock:
            known = self._open.get(worker)
        if known is not None and known[0] == ref:
            return known[1]
        transport = self.connect(ref)
        with self._lock:
            old, self._open[worker] = self._open.get(worker), (ref, transport)
        if old is not None:
            old[1].close()
        return transport

    def close(self) -> None:
        with self._lock:
            opened, self._open = self._open, {}
        for _, transport in opened.values():
            transport.close()


@dataclass(frozen=True)
class Reroute:
    """What failing over needs, fixed for one table (a step uses one table): built by RemoteExperts
    when it switches tables, read by `Pending` and `fail_over` (no call back into RemoteExperts)."""

    table: Table
    copies: dict  # (layer, expert id) -> workers holding a copy
    same_node: frozenset[int]
    transports: Transports
    health: WorkerHealth
    stats: DataPlaneStats
    on_down: Callable[[int, int], None]
    timeout_s: float


def mark_down(route: Reroute, worker: int, error: Exception) -> None:
    """Count the failure; mark `worker` down for its generation and report it once."""
    code = error_code(error)
    route.stats.failed(code)
    generation = route.table.workers[worker].generation
    if route.health.mark(worker, generation):
        log.warning("expert worker %d failed (%s); its rows go to other copies until it is healed", worker, code)
        route.on_down(worker, generation)


def fail_over(route: Reroute, failed: int, layer: int, rows: Tensor, group, out: Tensor, error) -> None:
    """Re-send a failed (or timed-out) worker's rows to other live copies of the same experts."""
    route.stats.failover()
    mark_down(route, failed, error)
    for expert_id, start, n in group:
        tried = {failed}  # each copy at most once: bounded even if a worker flaps
        while True:
            excluded = tried | route.health.down(route.table)
            live = [w for w in route.copies.get((layer, expert_id), ()) if w not in excluded]
            if not live:
                raise ExpertUnavailable(f"layer {layer} expert {expert_id}: worker {failed} failed "
                                        f"({error_code(error)}) and no other live copy answered; retry once "
                                        "it is back")
            worker = next((w for w in live if w in route.same_node), live[0])
            tried.add(worker)
            try:
                reply = route.transports.get(worker, route.table.workers[worker]).forward(
                    layer, rows[start:start + n], [expert_id], [n], route.timeout_s)
                out[start:start + n] = reply.to(rows.device, rows.dtype)
                break
            except Exception as e:  # noqa: BLE001 - then try the next live copy, if any
                mark_down(route, worker, e)


class Pending:
    """A layer's rows in flight; `result()` waits for them (failing over where a call failed)."""

    def __init__(self, route: Reroute, layer: int, rows: Tensor, groups, calls, submit_s: float):
        self.route, self.layer, self.rows = route, layer, rows
        self.groups, self.calls, self.submit_s = groups, calls, submit_s

    def result(self) -> Tensor:
        out = torch.empty_like(self.rows)
        wait = 0.0
        for worker, (future, index) in self.calls.items():
            t = time.perf_counter()
            try:
                out[index] = future.result().to(self.rows.device, self.rows.dtype)
            except Exception as e:  # noqa: BLE001 - transport errors of any kind: fail over
                fail_over(self.route, worker, self.layer, self.rows, self.groups[worker], out, e)
            wait += time.perf_counter() - t
        self.route.stats.record_layer(self.submit_s, wait, list(self.calls))
        return out


class RemoteExperts:
    def __init__(self, table: Table | None, connect: Callable[[WorkerRef], Transport], *, node_id: str = "",
                 call_timeout_s: float = 10.0, copy_choice: str = "even",
                 on_down: Callable[[int, int], None] | None = None):
        self.node_id, self.call_timeout_s, self.copy_choice = node_id, call_timeout_s, copy_choice
        self.on_down = on_down or (lambda worker, generation: None)
        self.stats = DataPlaneStats()
        self.health = WorkerHealth()
        self.transports = Transports(connect)
        self._lock = threading.Lock()
        self._next_table: Table | None = None
        self._table: Table | None = None
        self._route: Reroute | None = None
        self._copies: dict = {}
        self._costs: list[float] | None = None
        self.same_node: frozenset[int] = frozenset()  # workers on this router's node
        self._pool = futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="experts")
        if table is not None:
            self._apply(table)

    # -- the table -----------------------------------------------------------------------------
    @property
    def table(self) -> Table | None:
        return self._table

    def adopt(self, table: Table) -> None:
        """A newer table from the controller: used from the next step on."""
        with self._lock:
            newest = max((t.version for t in (self._table, self._next_table) if t is not None), default=-1)
            if table.version > newest:
                self._next_table = table

    def begin_step(self) -> None:
        """Called by the model at the start of every forward pass: the only place tables switch."""
        with self._lock:
            table, self._next_table = self._next_table, None
        if table is not None:
            self._apply(table)

    def apply_settings(self, copy_choice: str) -> None:
        self.copy_choice = copy_choice

    def _apply(self, table: Table) -> None:
        self._table, self._copies = table, table.placement.copies()
        self._costs = row_costs([ref.tier for ref in table.workers])  # None: untiered, the policy's rule
        self.same_node = frozenset(w for w, ref in enumerate(table.workers)
                                   if ref.node_id and ref.node_id == self.node_id)
        self.health.forget_healed(table)
        self._route = Reroute(table, self._copies, self.same_node, self.transports, self.health, self.stats,
                              self.on_down, self.call_timeout_s)

    # -- health ------------------------------------------------------------------------------
    def down_workers(self) -> list[tuple[int, int]]:
        """(worker, generation) pairs this router saw fail and has not seen healed."""
        return self.health.marked()

    def uncovered(self) -> list[Expert]:
        """Experts with no live copy right now (readiness: empty when every expert can be served)."""
        if self._table is None:
            return []
        down = self.health.down(self._table)
        return sorted(e for e, ws in self._copies.items() if all(w in down for w in ws))

    # -- the data path ---------------------------------------------------------------------
    def submit(self, layer: int, rows: Tensor, counts: Sequence[int]) -> Pending:
        route, costs = self._route, self._costs
        copies, down = route.copies, self.health.down(route.table)
        try:
            groups = (choose_tiered(layer, counts, copies, cost=costs, down=down, same_node=self.same_node)
                      if costs else
                      choose_copies(layer, counts, copies, down=down, same_node=self.same_node, rule=self.copy_choice))
        except NoLiveCopy as e:
            raise ExpertUnavailable(str(e)) from None
        if costs:
            self._count_tiers(groups)
        t0 = time.perf_counter()
        calls = {w: self._send(w, layer, rows, g) for w, g in groups.items()}
        return Pending(route, layer, rows, groups, calls, time.perf_counter() - t0)

    def _count_tiers(self, groups) -> None:
        rows: dict[str, int] = {}
        for w, g in groups.items():
            tier = self._table.workers[w].tier or "host"
            rows[tier] = rows.get(tier, 0) + sum(n for _, _, n in g)
        self.stats.record_tiers(rows)

    def run(self, layer: int, rows: Tensor, counts: Sequence[int]) -> Tensor:
        return self.submit(layer, rows, counts).result()

    def _send(self, worker: int, layer: int, rows: Tensor, group):
        index = torch.cat([torch.arange(s, s + n, device=rows.device) for _, s, n in group])
        transport = self.transports.get(worker, self._table.workers[worker])
        picked = rows.index_select(0, index)
        ready = None
        if picked.is_cuda:  # the rows are ready here; what the engine queues after them is not the call's
            ready = torch.cuda.Event()
            ready.record()
        future = self._pool.submit(on_side_stream, ready, transport.forward, layer, picked,
                                   [e for e, _, _ in group], [n for _, _, n in group], self.call_timeout_s)
        return future, index

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.transports.close()
