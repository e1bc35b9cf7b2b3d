"""The online hot-expert rebalancing loop, run inside the router replica.

Every interval: read the EMA loads, plan a placement (cluster.rebalance), and
if the policy says the gain is worth it, have workers load the new copies in
the background, switch the router's table atomically once all are ready, wait
for in-flight calls to drain, then retire the old copies. Traffic never stops:
until the switch the old table serves; after it, the new copies do.
"""
from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from cluster.placement import Placement
from cluster.rebalance import Worker, hand_back, imbalance, plan
from deployments import metrics
from deployments.data_plane import RemoteExperts
from deployments.policy import AutoscalePolicy

log = logging.getLogger("ray.serve")


class ExpertAutoscaler:
    def __init__(self, policy: AutoscalePolicy, tracker, remote: RemoteExperts, expert_bytes: int = 0):
        self.policy, self.tracker, self.remote = policy, tracker, remote
        self.expert_bytes = expert_bytes  # one routed expert's weights, for the memory budget
        self.lock = asyncio.Lock()  # one placement change at a time: rebalance, pool worker leaving
        self.retired: set[int] = set()  # pool workers that left: no copies, not counted
        self.last_change = 0.0
        self.history: list[dict] = []

    def set_policy(self, policy: AutoscalePolicy) -> None:
        self.policy = policy
        self.tracker.alpha = policy.ema_alpha
        self.remote.token_split = policy.token_split

    async def run(self) -> None:
        self.set_policy(self.policy)
        while True:
            await asyncio.sleep(self.policy.interval_s)
            if self.policy.enabled:
                try:
                    async with self.lock:
                        await self.step()
                except Exception:  # noqa: BLE001 - a failed change must not stop the loop
                    log.exception("rebalance failed")
                    metrics.REBALANCES.labels("failed").inc()

    def _decide(self) -> tuple[str, Placement | None, float, float]:
        loads = np.array(self.tracker.snapshot()["ema_tokens_per_step"])
        layers, current = list(self.tracker.moe_layers), self.remote.placement
        before = imbalance(loads, layers, current, current.num_workers, self.active())
        if before < self.policy.hot_threshold:
            return "balanced", None, before, before
        if time.monotonic() - self.last_change < self.policy.cooldown_s:
            return "cooldown", None, before, before
        slots = self.policy.layer_slots(len(layers), self.expert_bytes)
        coactivation = self.tracker.pairs().numpy() if self.policy.co_activation else None
        workers = [Worker(layer_slots=0 if w in self.retired else slots) for w in range(current.num_workers)]
        new = plan(loads, layers, workers,
                   self.policy.extra_slots_per_layer, current, self.policy.hierarchical,
                   self.policy.max_copies_per_expert, coactivation)
        if before - new.max_over_mean < self.policy.min_gain:
            return "small_gain", None, before, new.max_over_mean
        return "rebalance", new.placement, before, new.max_over_mean

    async def step(self) -> str:
        decision, new, before, after = self._decide()
        if new is None:
            metrics.REBALANCES.labels(f"skipped_{decision}").inc()
            return decision
        t0 = time.perf_counter()
        old = self.remote.placement
        adds = [sorted(set(n) - set(o)) for n, o in zip(new.workers, old.workers)]
        drops = [sorted(set(o) - set(n)) for n, o in zip(new.workers, old.workers)]
        loaded = await asyncio.gather(*(asyncio.to_thread(self.remote.load, w, adds[w])
                                        for w in range(len(adds)) if adds[w]))
        self.remote.swap_placement(new)  # every new copy is ready: switch in one step
        self.last_change = time.monotonic()
        await asyncio.sleep(self.policy.drain_s)
        await asyncio.gather(*(asyncio.to_thread(self.remote.retire, w, drops[w])
                               for w in range(len(drops)) if drops[w]))
        seconds = time.perf_counter() - t0
        metrics.REBALANCES.labels("done").inc()
        metrics.WEIGHT_BYTES_MOVED.inc(sum(loaded))
        metrics.REBALANCE_SECONDS.observe(seconds)
        self.history.append({"time": time.time(), "max_over_mean_before": round(before, 3),
                             "max_over_mean_planned": round(after, 3), "copies_added": sum(map(len, adds)),
                             "copies_retired": sum(map(len, drops)), "bytes_loaded": sum(loaded),
                             "seconds": round(seconds, 3)})
        log.info("rebalanced: max/mean %.2f -> %.2f, %d copies added", before, after, sum(map(len, adds)))
        return "rebalanced"

    def active(self) -> list[int]:
        return [w for w in range(self.remote.placement.num_workers) if w not in self.retired]

    async def remove_worker(self, worker: int) -> int:
        """A pool worker is leaving: hand its copies back (copies only it held are loaded onto
        the workers holding the fewest first), switch tables, drain. Returns copies moved."""
        async with self.lock:
            old = self.remote.placement
            new = hand_back(old, worker, self.active())
            moved = {w: sorted(set(n) - set(o)) for w, (n, o) in enumerate(zip(new.workers, old.workers))}
            await asyncio.gather(*(asyncio.to_thread(self.remote.load, w, s) for w, s in moved.items() if s))
            self.retired.add(worker)
            self.remote.swap_placement(new)
            await asyncio.sleep(self.policy.drain_s)
        handed_back = sum(map(len, moved.values()))
        self.history.append({"time": time.time(), "worker_left": worker, "copies_handed_back": handed_back})
        log.info("expert pool worker %d left; %d copies handed back", worker, handed_back)
        return handed_back
