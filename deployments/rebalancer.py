"""One placement change at a time, never stalling traffic:

    decide (pure: cluster.autoscale) → workers load the new copies in the background
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

import numpy as np

from cluster import autoscale
from cluster.autoscale import Decision
from cluster.placement import Expert, Placement
from cluster.profile import load_profile
from cluster.staging import changes, stage_moves
from cluster.tiers import Hysteresis, TierLayout, profile_placement, tier_step
from deployments import metrics
from deployments.membership import Membership
from deployments.policy import AutoscalePolicy
from deployments.table_state import TableState
from deployments.tier_config import profile_loads

log = logging.getLogger("ray.serve")


class Rebalancer:
    def __init__(self, policy: AutoscalePolicy, state: TableState, membership: Membership, *,
                 moe_layers: list[int], expert_bytes: int, tiers: TierLayout | None = None, min_copies: int = 1):
        self.policy, self.state, self.membership = policy, state, membership
        self.moe_layers, self.expert_bytes = moe_layers, expert_bytes
        self.min_copies = min_copies  # the app's expert_copies: the online planner never retires below it
        self.lock = asyncio.Lock()  # one placement change at a time (rebalance, heal, pool joins/leaves)
        self.last_change = 0.0
        self.history: list[dict] = []
        self._pending_retire: list[tuple[int, int, list[Expert]]] = []  # (version, worker, experts)
        self.static_applied: str | None = None  # the profile a static placement was planned from
        self.tiers, self._moved, self._tier_steps = tiers, {}, 0  # expert tiers: promote / demote instead
        self._tier_bytes: dict[str, int] = {}  # bytes loaded per tier by the change under way

    def decide(self, loads: np.ndarray, coactivation: np.ndarray | None) -> Decision:
        """`cluster.autoscale.decide` on the table in force and the policy now."""
        table = self.state.table
        limits = self.policy.limits(num_copies=len(table.placement.copies()) * self.min_copies,
                                    active_workers=len(table.active()), expert_bytes=self.expert_bytes,
                                    min_copies=self.min_copies)
        return autoscale.decide(loads, table=table, limits=limits, moe_layers=self.moe_layers,
                                expert_bytes=self.expert_bytes, since_change_s=time.monotonic() - self.last_change,
                                coactivation=coactivation)

    def tier_decide(self, loads: np.ndarray) -> Decision:
        """Expert tiers: promote experts that turned hot to the fast tier, demote cold ones (hysteresis
        in cluster.tiers); the change then moves like any other (staged, no stall)."""
        if loads.sum() <= 0:
            return Decision("no_load", None, 0.0, 0.0)
        if time.monotonic() - self.last_change < self.policy.cooldown_s:
            return Decision("cooldown", None, 0.0, 0.0)
        self._tier_steps += 1
        d, new = tier_step(loads, self.state.table.placement, self.tiers, self.moe_layers, moved=self._moved,
                           now=self._tier_steps, rule=Hysteresis(noise_z=self.policy.tier_noise_z),
                           window_steps=self.policy.window_steps)
        if new is None:
            return Decision("no_change", None, 0.0, 0.0)
        metrics.TIER_MOVES.labels("promoted").inc(len(d.promoted))
        metrics.TIER_MOVES.labels("demoted").inc(len(d.demoted))
        return Decision("promote", new, 0.0, 0.0)

    def static_plan(self) -> Decision:
        """`cluster.autoscale.static` on the policy's recorded profile; with tiers, the fast tier's room
        to the profile's hottest experts (`cluster.tiers.profile_placement`). A plan equal to the
        placement in force moves nothing (the app started there, or the profile did not change)."""
        decision = self._static_decision(self.policy.profile_file)
        held = [set(w) for w in self.state.table.placement.workers]
        if decision.placement is not None and [set(w) for w in decision.placement.workers] == held:
            return Decision("static", None, decision.before, decision.before)  # held, as planned
        return decision

    def _static_decision(self, path: str) -> Decision:
        if self.tiers:
            experts = 1 + max(e for _, e in self.state.table.placement.copies())  # a tier placement covers all
            loads = profile_loads(path, self.moe_layers, experts)
            new = profile_placement(loads, self.state.table.placement, self.tiers, self.moe_layers)
            return Decision("static", new, 0.0, 0.0)
        profile = load_profile(path)
        try:
            return autoscale.static(profile.loads, list(profile.layers), table=self.state.table,
                                    moe_layers=self.moe_layers, extra_per_layer=self.policy.extra_slots_per_layer)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def set_policy(self, policy: AutoscalePolicy) -> None:
        """Every policy put in static mode plans once more: back from online, or a profile re-recorded
        at the same path, must not keep the placement of before."""
        self.policy = policy
        if policy.mode == "static":
            self.static_applied = None

    def reset_cooldown(self) -> None:
        self.last_change = 0.0

    async def step(self, loads: np.ndarray, coactivation: np.ndarray | None) -> str:
        if not self.state.confirmed:
            return "unconfirmed"  # a restarted controller has not heard the routers' table yet
        async with self.lock:
            await self.retry_retirements()
            if self.policy.mode == "static":
                if self.static_applied == self.policy.profile_file:
                    return "static"  # planned once: hold
                self.static_applied = self.policy.profile_file
                decision = self.static_plan()
            else:
                decision = self.tier_decide(loads) if self.tiers else self.decide(loads, coactivation)
            if decision.placement is None:
                metrics.REBALANCES.labels(f"skipped_{decision.reason}").inc()
                return decision.reason
            return await self.change(decision.placement, decision)

    async def change(self, new: Placement, decision: Decision | None = None,
                     workers: tuple | None = None) -> str:
        """Move to `new` through one or more table versions (at most `max_copies_per_stage` new copies
        each, every one covering every expert): per stage load, publish, wait for every router,
        retire. Call with `lock` held. Returns done, failed or abandoned."""
        metrics.REBALANCES.labels("started").inc()
        t0 = time.perf_counter()
        table = self.state.table
        refs = workers if workers is not None else table.workers
        stages = [new]
        if self.policy.max_copies_per_stage:
            stages = stage_moves(old=table.placement, new=new, max_copies=self.policy.max_copies_per_stage) or [new]
        adds, drops = changes(table.placement, new)
        loaded, outcome, version, self._tier_bytes = 0, "done", table.version, {}
        for stage in stages:
            outcome, stage_bytes, version = await self._switch(stage, refs)
            loaded += stage_bytes
            if outcome != "done":
                break
        metrics.REBALANCES.labels(outcome).inc()
        if outcome == "done":
            metrics.LAST_REBALANCE.set(time.time())
        seconds = time.perf_counter() - t0
        metrics.REBALANCE_SECONDS.observe(seconds)
        self._record(decision, outcome, adds, drops, loaded, seconds, version, len(stages))
        return outcome

    async def _switch(self, new: Placement, refs) -> tuple[str, int, int]:
        """One table version: load the new copies, publish, wait for every router, retire the old ones.
        Returns (outcome, bytes loaded, version)."""
        table = self.state.table
        adds, drops = changes(table.placement, new)
        loading = [w for w in range(len(adds)) if adds[w]]
        results = await asyncio.gather(*(self.membership.load_copies(refs[w], adds[w]) for w in loading),
                                       return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        nxt = table.changed(new, refs)
        try:
            if failed:
                raise failed[0]
            self.state.publish(nxt)  # fails if a restored table overtook ours meanwhile
        except Exception as e:  # noqa: BLE001 - keep the old table and take back what did load
            log.warning("placement change failed (%s); table v%d kept, new copies retired", e, table.version)
            loaded_ok = [w for w, r in zip(loading, results) if not isinstance(r, BaseException)]
            await self._retire([(nxt.version, w, adds[w]) for w in loaded_ok], table.placement, refs)
            return "failed", 0, table.version
        loaded = sum(r for r in results if not isinstance(r, BaseException))
        self.last_change = time.monotonic()
        metrics.WEIGHT_BYTES_MOVED.inc(loaded)
        for w, r in zip(loading, results):
            if refs[w].tier:
                metrics.TIER_BYTES_MOVED.labels(refs[w].tier).inc(r)
                self._tier_bytes[refs[w].tier] = self._tier_bytes.get(refs[w].tier, 0) + r
        retire = [(nxt.version, w, drops[w]) for w in range(len(drops)) if drops[w]]
        if not await self.state.wait_switched(nxt.version, self.policy.switch_timeout_s):
            self._pending_retire.extend(retire)
            log.warning("table v%d: not every router switched within %.0f s; nothing retired, next change may run",
                        nxt.version, self.policy.switch_timeout_s)
            return "abandoned", loaded, nxt.version
        await self._retire(retire, nxt.placement, nxt.workers)
        return "done", loaded, nxt.version

    async def _retire(self, retire: list[tuple[int, int, list[Expert]]], keep: Placement, refs) -> None:
        """Retire `experts` on each worker, but never a copy `keep` (the table in force) still lists."""
        for _, worker, experts in retire:
            kept = set(keep.workers[worker]) if worker < keep.num_workers else set()
            try:
                await self.membership.retire(refs[worker], [e for e in experts if e not in kept])
            except Exception as e:  # noqa: BLE001 - a dead worker holds nothing anyway
                log.info("retiring copies on worker %d failed: %s", worker, e)

    async def retry_retirements(self) -> None:
        ready = [r for r in self._pending_retire if self.state.switched(r[0])]
        if ready:
            self._pending_retire = [r for r in self._pending_retire if r not in ready]
            await self._retire(ready, self.state.table.placement, self.state.table.workers)

    def _record(self, decision, outcome, adds, drops, loaded, seconds, version, stages) -> None:
        self.history.append({"time": time.time(), "outcome": outcome, "table_version": version, "stages": stages,
                             "reason": decision.reason if decision else "membership",
                             "max_over_mean_before": round(decision.before, 3) if decision else None,
                             "max_over_mean_planned": round(decision.after, 3) if decision else None,
                             "copies_added": sum(map(len, adds)), "copies_retired": sum(map(len, drops)),
                             "bytes_loaded": loaded, "seconds": round(seconds, 3),
                             **({"bytes_loaded_per_tier": dict(self._tier_bytes)} if self.tiers else {})})
        del self.history[:-200]
        log.info("placement change %s: table v%d, %d copies added, %d retired", outcome, version,
                 sum(map(len, adds)), sum(map(len, drops)))
