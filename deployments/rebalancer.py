"""One placement change at a time, never stalling traffic:

    decide (pure: cluster.rebalance) → workers load the new copies in the background
    → publish table v+1 → wait until every router routes by it → retire the old copies

Until the switch the old table serves; after it, the new copies do; nothing in
flight fails. A switch that not every router makes within `switch_timeout_s`
is abandoned: nothing is retired (the new table still holds every old copy the
slow router may use), it is counted and logged, and the next change can run;
its retirements are retried once every router has caught up.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import numpy as np

from cluster.placement import Expert, Placement, Table
from cluster.rebalance import Worker, imbalance, plan
from deployments import metrics
from deployments.membership import Membership
from deployments.policy import AutoscalePolicy
from deployments.table_state import TableState

log = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class Decision:
    reason: str  # "rebalance" or why not: balanced, cooldown, small_gain, no_change, no_load
    placement: Placement | None
    before: float
    after: float


def diff(old: Placement, new: Placement) -> tuple[list[list[Expert]], list[list[Expert]]]:
    """Per worker: copies to add, copies to retire."""
    olds = list(old.workers) + [()] * (new.num_workers - old.num_workers)
    adds = [sorted(set(n) - set(o)) for n, o in zip(new.workers, olds)]
    drops = [sorted(set(o) - set(n)) for n, o in zip(new.workers, olds)]
    return adds, drops


class Rebalancer:
    def __init__(self, policy: AutoscalePolicy, state: TableState, membership: Membership, *,
                 moe_layers: list[int], expert_bytes: int):
        self.policy, self.state, self.membership = policy, state, membership
        self.moe_layers, self.expert_bytes = moe_layers, expert_bytes
        self.lock = asyncio.Lock()  # one placement change at a time (rebalance, heal, pool joins/leaves)
        self.last_change = 0.0
        self.history: list[dict] = []
        self._pending_retire: list[tuple[int, int, list[Expert]]] = []  # (version, worker, experts)

    def decide(self, loads: np.ndarray, coactivation: np.ndarray | None) -> Decision:
        table, policy = self.state.table, self.policy
        if loads.sum() <= 0:
            return Decision("no_load", None, 0.0, 0.0)
        current, active = table.placement, table.active()
        before = imbalance(loads, self.moe_layers, current, current.num_workers, active)
        if before < policy.hot_threshold:
            return Decision("balanced", None, before, before)
        if time.monotonic() - self.last_change < policy.cooldown_s:
            return Decision("cooldown", None, before, before)
        slots = policy.layer_slots(len(self.moe_layers), self.expert_bytes)
        workers = [Worker(node=ref.node_id or "node-0", layer_slots=0 if ref.retired else slots)
                   for ref in table.workers]
        new = plan(loads, self.moe_layers, workers, policy.extra_slots_per_layer, current, policy.hierarchical,
                   policy.max_copies_per_expert, coactivation if policy.co_activation else None)
        if [set(w) for w in new.placement.workers] == [set(w) for w in current.workers]:
            return Decision("no_change", None, before, new.max_over_mean)  # min_gain 0 must not move nothing
        if before - new.max_over_mean < policy.min_gain:
            return Decision("small_gain", None, before, new.max_over_mean)
        return Decision("rebalance", new.placement, before, new.max_over_mean)

    async def step(self, loads: np.ndarray, coactivation: np.ndarray | None) -> str:
        async with self.lock:
            await self.retry_retirements()
            decision = self.decide(loads, coactivation)
            if decision.placement is None:
                metrics.REBALANCES.labels(f"skipped_{decision.reason}").inc()
                return decision.reason
            return await self.change(decision.placement, decision)

    async def change(self, new: Placement, decision: Decision | None = None,
                     workers: tuple | None = None) -> str:
        """Load, publish, wait for every router, retire. Call with `lock` held."""
        metrics.REBALANCES.labels("started").inc()
        t0 = time.perf_counter()
        table = self.state.table
        refs = workers if workers is not None else table.workers
        adds, drops = diff(table.placement, new)
        try:
            loaded = await asyncio.gather(*(self.membership.load_copies(refs[w], adds[w])
                                            for w in range(len(adds)) if adds[w]))
        except Exception as e:  # noqa: BLE001 - a worker could not load: keep the old table
            metrics.REBALANCES.labels("failed").inc()
            log.warning("rebalance failed while loading copies (%s); old table kept", e)
            return "failed"
        nxt = table.changed(new, refs)
        self.state.publish(nxt)
        self.last_change = time.monotonic()
        metrics.WEIGHT_BYTES_MOVED.inc(sum(loaded))
        switched = await self.state.wait_switched(nxt.version, self.policy.switch_timeout_s)
        retire = [(nxt.version, w, drops[w]) for w in range(len(drops)) if drops[w]]
        if not switched:
            self._pending_retire.extend(retire)
            metrics.REBALANCES.labels("abandoned").inc()
            log.warning("table v%d: not every router switched within %.0f s; nothing retired", nxt.version,
                        self.policy.switch_timeout_s)
            outcome = "abandoned"
        else:
            await self._retire(retire, nxt)
            metrics.REBALANCES.labels("done").inc()
            metrics.LAST_REBALANCE.set(time.time())
            outcome = "done"
        seconds = time.perf_counter() - t0
        metrics.REBALANCE_SECONDS.observe(seconds)
        self._record(decision, outcome, adds, drops, sum(loaded), seconds, nxt.version)
        return outcome

    async def _retire(self, retire: list[tuple[int, int, list[Expert]]], table: Table) -> None:
        for _, worker, experts in retire:
            keep = set(table.placement.workers[worker]) if worker < table.placement.num_workers else set()
            try:
                await self.membership.retire(table.workers[worker], [e for e in experts if e not in keep])
            except Exception as e:  # noqa: BLE001 - a dead worker holds nothing anyway
                log.info("retiring copies on worker %d failed: %s", worker, e)

    async def retry_retirements(self) -> None:
        ready = [r for r in self._pending_retire if self.state.switched(r[0])]
        if ready:
            self._pending_retire = [r for r in self._pending_retire if r not in ready]
            await self._retire(ready, self.state.table)

    def _record(self, decision, outcome, adds, drops, loaded, seconds, version) -> None:
        self.history.append({"time": time.time(), "outcome": outcome, "table_version": version,
                             "max_over_mean_before": round(decision.before, 3) if decision else None,
                             "max_over_mean_planned": round(decision.after, 3) if decision else None,
                             "copies_added": sum(map(len, adds)), "copies_retired": sum(map(len, drops)),
                             "bytes_loaded": loaded, "seconds": round(seconds, 3)})
        del self.history[:-200]
        log.info("placement change %s: table v%d, %d copies added, %d retired", outcome, version,
                 sum(map(len, adds)), sum(map(len, drops)))
