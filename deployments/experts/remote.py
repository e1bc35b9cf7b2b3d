"""The router's ExpertExecutor: a layer's rows fanned out to the workers holding copies.

Shapes: N rows (sorted by expert_id), D hidden. Per call: copy choice (a pure
rule, cluster.copy_choice) → send (one call per worker, concurrently, each with
a deadline) → receive → on failure re-send that worker's rows to other live
copies (expert compute is a pure function: a retry is safe, no request has to
fail). A failed worker is marked down for its current generation and reported
through `on_down`; the controller heals it and publishes a table with a new
generation, which brings it back. With no live copy: ExpertUnavailable at once.

Tables switch only at step boundaries (`begin_step`), so a step uses one table.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from typing import Callable, Protocol, Sequence

import torch
from torch import Tensor

from cluster.copy_choice import NoLiveCopy, choose_copies
from cluster.placement import Expert, Table, WorkerRef

log = logging.getLogger("ray.serve")


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


class DataPlaneStats:
    """Cumulative data-plane figures for the step-time breakdown and /admin/stats."""

    def __init__(self):
        self.lock = threading.Lock()
        self.times = {"serialize_s": 0.0, "wait_s": 0.0, "deserialize_s": 0.0, "calls": 0}
        self.failovers = 0
        self.failures: dict[str, int] = {}  # error code -> failed expert calls
        self.calls_per_worker: dict[int, int] = {}

    def add(self, **kw: float) -> None:
        with self.lock:
            for k, v in kw.items():
                self.times[k] += v

    def failed(self, code: str) -> None:
        with self.lock:
            self.failures[code] = self.failures.get(code, 0) + 1

    def snapshot(self) -> dict:
        with self.lock:  # noqa: SIM117
            return {**self.times, "failovers": self.failovers, "failures": dict(self.failures),
                    "calls_per_worker": {str(w): n for w, n in sorted(self.calls_per_worker.items())}}


def _code(error: Exception) -> str:
    code = getattr(error, "code", None)
    return code().name if callable(code) else type(error).__name__


class RemoteExperts:
    def __init__(self, table: Table, connect: Callable[[WorkerRef], Transport], *, node_id: str = "",
                 call_timeout_s: float = 10.0, token_split: str = "even",
                 on_down: Callable[[int, int], None] | None = None):
        self.connect, self.node_id = connect, node_id
        self.call_timeout_s, self.token_split = call_timeout_s, token_split
        self.on_down = on_down or (lambda worker, generation: None)
        self.stats = DataPlaneStats()
        self._down: dict[int, int] = {}  # worker -> generation it failed in
        self._transports: dict[int, tuple[WorkerRef, Transport]] = {}
        self._lock = threading.Lock()
        self._pending: Table | None = None
        self._pool = futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="experts")
        self._apply(table)

    # -- the table -----------------------------------------------------------------------------
    @property
    def table(self) -> Table:
        return self._table

    def adopt(self, table: Table) -> None:
        """A newer table from the controller: used from the next step on."""
        with self._lock:
            if table.version > max(self._table.version, self._pending.version if self._pending else -1):
                self._pending = table

    def begin_step(self) -> None:
        """Called by the model at the start of every forward pass: the only place tables switch."""
        with self._lock:
            table, self._pending = self._pending, None
        if table is not None:
            self._apply(table)

    def _apply(self, table: Table) -> None:
        self._table, self._copies = table, table.placement.copies()
        with self._lock:  # a newer generation of a worker is a healed worker: forget its failure
            self._down = {w: g for w, g in self._down.items() if w < len(table.workers)
                          and table.workers[w].generation == g}
        self.local = frozenset(w for w, ref in enumerate(table.workers) if ref.node_id and ref.node_id == self.node_id)

    # -- health ------------------------------------------------------------------------------
    def down_workers(self) -> list[tuple[int, int]]:
        """(worker, generation) pairs this router saw fail and has not seen healed."""
        with self._lock:
            return sorted(self._down.items())

    def _down_now(self) -> set[int]:
        workers = self._table.workers
        with self._lock:
            return {w for w, gen in self._down.items() if w < len(workers) and workers[w].generation == gen}

    def uncovered(self) -> list[Expert]:
        """Experts with no live copy right now (readiness: empty when every expert can be served)."""
        down = self._down_now()
        return sorted(e for e, ws in self._copies.items() if all(w in down for w in ws))

    def _mark_down(self, worker: int, error: Exception) -> None:
        code = _code(error)
        self.stats.failed(code)
        generation = self._table.workers[worker].generation
        with self._lock:
            if self._down.get(worker) == generation:
                return
            self._down[worker] = generation
        log.warning("expert worker %d failed (%s); its rows go to other copies until it is healed", worker, code)
        self.on_down(worker, generation)

    # -- the data path ---------------------------------------------------------------------
    def _transport(self, worker: int) -> Transport:
        ref = self._table.workers[worker]
        with self._lock:
            known = self._transports.get(worker)
        if known is not None and known[0] == ref:
            return known[1]
        transport = self.connect(ref)
        with self._lock:
            old, self._transports[worker] = self._transports.get(worker), (ref, transport)
        if old is not None:
            old[1].close()
        return transport

    def run(self, layer: int, rows: Tensor, counts: Sequence[int]) -> Tensor:
        copies = self._copies
        try:
            groups = choose_copies(layer, counts, copies, down=self._down_now(), local=self.local,
                                   rule=self.token_split)
        except NoLiveCopy as e:
            raise ExpertUnavailable(str(e)) from None
        t0 = time.perf_counter()
        calls = {w: self._send(w, layer, rows, g) for w, g in groups.items()}
        t1 = time.perf_counter()
        out = torch.empty_like(rows)
        wait = 0.0
        for worker, (future, index) in calls.items():
            t = time.perf_counter()
            try:
                out[index] = future.result().to(rows.device, rows.dtype)
            except Exception as e:  # noqa: BLE001 - transport errors of any kind: fail over
                self._failover(copies, worker, layer, rows, groups[worker], out, e)
            wait += time.perf_counter() - t
        self.stats.add(serialize_s=t1 - t0, wait_s=wait, calls=len(calls))
        with self.stats.lock:
            for w in calls:
                self.stats.calls_per_worker[w] = self.stats.calls_per_worker.get(w, 0) + 1
        return out

    def _send(self, worker: int, layer: int, rows: Tensor, group):
        index = torch.cat([torch.arange(s, s + n, device=rows.device) for _, s, n in group])
        transport = self._transport(worker)
        future = self._pool.submit(transport.forward, layer, rows.index_select(0, index),
                                   [e for e, _, _ in group], [n for _, _, n in group], self.call_timeout_s)
        return future, index

    def _failover(self, copies, failed: int, layer: int, rows: Tensor, group, out: Tensor, error) -> None:
        """Re-send a failed (or timed-out) worker's rows to other live copies of the same experts."""
        with self.stats.lock:
            self.stats.failovers += 1
        self._mark_down(failed, error)
        for expert_id, start, n in group:
            tried = {failed}  # each copy at most once: bounded even if a worker flaps
            while True:
                live = [w for w in copies.get((layer, expert_id), ()) if w not in tried | self._down_now()]
                if not live:
                    raise ExpertUnavailable(f"layer {layer} expert {expert_id}: worker {failed} failed "
                                            f"({_code(error)}) and no other live copy answered; retry once it "
                                            "is back")
                worker = next((w for w in live if w in self.local), live[0])
                tried.add(worker)
                try:
                    reply = self._transport(worker).forward(layer, rows[start:start + n], [expert_id], [n],
                                                            self.call_timeout_s)
                    out[start:start + n] = reply.to(rows.device, rows.dtype)
                    break
                except Exception as e:  # noqa: BLE001 - then try the next live copy, if any
                    self._mark_down(worker, e)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            transports, self._transports = self._transports, {}
        for _, transport in transports.values():
            transport.close()
