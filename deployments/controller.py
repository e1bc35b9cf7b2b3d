"""The placement controller: one Serve replica that owns the versioned placement table.

It aggregates the expert load every router reports, runs the autoscaling policy
(deployments/rebalancer.py), keeps membership (fixed workers, pool workers
joining and leaving) and heals failed workers (deployments/membership.py), and
answers every router's report with the newest table (deployments/table_state.py).

Traffic never depends on it: routers keep their last table. If it dies, Serve
restarts it; the new replica starts from the initial table, asks the routers
for theirs (the newest version wins), takes back from their reports the policy
last set by PUT /admin/policy (every router keeps it), pool workers register
again, and the policy loop resumes. The change history starts empty.
"""
from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from cluster.placement import Table, WorkerRef
from cluster.rebalance import hand_back
from deployments import metrics
from deployments.cluster_view import cluster_stats, down_workers, expert_load, load_view, update_metrics
from deployments.ingress_board import IngressBoard
from deployments.membership import Membership
from deployments.messages import AppSpec, ControllerReply, RouterReport, RouterSettings
from deployments.policy import AutoscalePolicy, check_copies
from deployments.rebalancer import Rebalancer
from deployments.table_state import TableState
from deployments.tier_config import profile_loads

log = logging.getLogger("ray.serve")
# A PUT /admin/policy waits this long at most for the routers to hold the new policy. Right after a
# restart it first waits for the routers (HEARD_TIMEOUT_S from the start at most): 8 s in all, within the
# admin route's ADMIN_CALL_TIMEOUT_S (10 s) once the new controller runs (not counting Serve's restart).
POLICY_HELD_TIMEOUT_S = 3.0
REPORTING_S = 1.5  # routers report every 0.5 s: one silent this long is not waited for by a PUT
HEARD_TIMEOUT_S = 5.0  # a restarted controller waits this long from its start for a first report


class WrongBuild(RuntimeError):
    """A replica of another build of the application (both run during Serve's rolling updates)."""


class PlacementController:
    """Serve deployment (options applied in deployments/app.py)."""

    async def __init__(self, spec: AppSpec, workers: list):
        self.spec = spec
        self.membership = Membership(workers, spec.data_plane_secret)
        table = None
        if spec.placement is not None:
            table = Table(1, spec.placement, await self.membership.fixed_refs())
        self.state = TableState(table)
        self.policy = spec.policy or AutoscalePolicy(enabled=False)
        self.policy_revision = 0.0  # when PUT /admin/policy last set it (0: the deployment's own)
        self.policy_held: dict[str, float] = {}  # per router, the revision its last report held
        self.rebalancer = Rebalancer(self.policy, self.state, self.membership, moe_layers=list(spec.moe_layers),
                                     expert_bytes=spec.expert_bytes, tiers=spec.tiers,
                                     min_copies=spec.cfg.expert_copies if spec.cfg is not None else 1)
        self.reports: dict[str, RouterReport] = {}
        self.board = IngressBoard()
        self.report_count = 0
        self._started = time.monotonic()
        self._healing: dict[int, asyncio.Task] = {}
        self._policy_changed = asyncio.Event()
        self._loop_task = asyncio.get_running_loop().create_task(self._policy_forever())

    # -- routers -------------------------------------------------------------------------------
    async def current_table(self, build_id: str, router_id: str) -> Table | None:
        """A new router's first table, once ours is confirmed; from then on the router is waited for.
        Refused to a router of another build (rolling update)."""
        if build_id != self.spec.build_id:
            raise WrongBuild(f"controller of build {self.spec.build_id[:8]}, router of {build_id[:8]}")
        await self.state.wait_confirmed()
        return self.state.handed_out(router_id)

    async def report(self, report: RouterReport) -> ControllerReply | None:
        if report.build_id != self.spec.build_id:
            return None  # a router of the other build during a rolling update: neither side acts on it
        self.report_count += 1
        self.reports[report.router_id] = report
        self.state.seen(report.router_id, report.table_version, report.node_id, report.stats)
        if report.table is not None and self.state.restore_from(report.table):
            log.warning("controller: restored placement table v%d from router %s", report.table.version,
                        report.router_id)
        self._restore_policy(report)
        self.policy_held[report.router_id] = report.settings.revision if report.settings else 0.0
        table = self.state.table
        self._heal_reported(report)
        settings = RouterSettings(self.policy.copy_choice, self.policy.ema_alpha,
                                  self.policy.model_dump() if self.policy_revision else None, self.policy_revision)
        newer = table is not None and table.version > report.table_version
        behind = table is not None and report.table_version > table.version  # we restarted
        return ControllerReply(table if newer else None, settings, send_table=behind)

    def _restore_policy(self, report: RouterReport) -> None:
        """A router holds a policy set by PUT newer than ours: we restarted and lost it."""
        held = report.settings
        if held is None or held.policy is None or held.revision <= self.policy_revision:
            return
        try:
            self._apply_policy(AutoscalePolicy(**held.policy), held.revision)
        except ValueError as e:  # e.g. its profile file has gone since: keep ours, say why once
            self.policy_revision = held.revision
            log.error("controller: the policy router %s holds cannot be restored: %s", report.router_id, e)
            return
        log.warning("controller: restored the policy set by PUT /admin/policy at %s from router %s",
                    time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held.revision)), report.router_id)

    def _heal_reported(self, report: RouterReport) -> None:
        table = self.state.table
        for worker, generation in report.down:
            if table is None or worker >= len(table.workers) or table.workers[worker].generation != generation:
                continue  # already healed (the router will see the new generation)
            task = self._healing.get(worker)
            if task is None or task.done():
                self._healing[worker] = asyncio.get_running_loop().create_task(self._heal(worker, generation))

    async def _heal(self, worker: int, generation: int) -> None:
        await self.state.wait_confirmed()
        table = self.state.table
        ref = await self.membership.heal(worker, table.workers[worker], list(table.placement.workers[worker]))
        if ref is None:
            log.error("expert worker %d did not come back", worker)
            return
        async with self.rebalancer.lock:
            table = self.state.table
            if table.workers[worker].generation != generation:
                return
            await self.membership.load_copies(ref, list(table.placement.workers[worker]))  # if it changed meanwhile
            refs = table.workers[:worker] + (ref,) + table.workers[worker + 1:]
            self.state.publish(table.changed(workers=refs))

    # -- the expert pool -----------------------------------------------------------------------
    async def register_worker(self, endpoints: dict, build_id: str) -> int:
        """A pool replica joins, empty: the next rebalance hands it copies of the hottest experts.
        `endpoints`: its WorkerRef fields (address, node, local socket, device: the transport)."""
        if build_id != self.spec.build_id:
            raise WrongBuild("a pool worker of another build")
        table = self.state.table
        if table is None:
            raise RuntimeError("the expert pool needs fixed expert workers (num_workers ≥ 1)")
        address = endpoints["address"]
        known = _live_worker(table, address)
        if known is not None:  # the usual case: a pool replica re-registering every second
            return known
        await self.state.wait_confirmed()
        async with self.rebalancer.lock:
            table = self.state.table
            known = _live_worker(table, address)
            if known is not None:
                return known
            self.state.publish(table.changed(table.placement.with_worker(), table.workers + (WorkerRef(**endpoints),)))
            self.rebalancer.reset_cooldown()  # a new worker: no cooldown before using it
            return len(table.workers)

    async def unregister_worker(self, address: str, build_id: str) -> int:
        """A pool replica is stopping: its copies are handed back first. Returns copies moved."""
        if build_id != self.spec.build_id:
            raise WrongBuild("a pool worker of another build")
        await self.state.wait_confirmed()
        async with self.rebalancer.lock:
            table = self.state.table
            worker = _live_worker(table, address)
            if worker is None:
                return 0
            new = hand_back(table.placement, worker, table.active())
            refs = tuple(WorkerRef(r.address, r.node_id, r.generation, True) if w == worker else r
                         for w, r in enumerate(table.workers))
            before = sum(map(len, table.placement.workers))
            await self.rebalancer.change(new, workers=refs)
            return sum(map(len, new.workers)) - before + len(table.placement.workers[worker])

    # -- the policy loop -----------------------------------------------------------------------
    async def _policy_forever(self) -> None:
        while True:
            await self._sleep_interval()
            self.state.forget_gone()
            self.policy_held = {r: v for r, v in self.policy_held.items() if r in self.state.routers}
            if not (self.policy.enabled and self.state.table is not None and self.state.live_routers()):
                continue
            try:
                loads, coactivation = expert_load(self.reports, self.state.live_routers())
                await self.rebalancer.step(np.asarray(loads), coactivation)
            except Exception:  # noqa: BLE001 - a failed change must not stop the loop
                log.exception("rebalance failed")
                metrics.REBALANCES.labels("failed").inc()

    async def _sleep_interval(self) -> None:
        """interval_s from now, by the policy in force at each moment: a PUT that lowered it (from a mistaken
        3600) took effect only once the old interval had run out. Other changes do not push the look back."""
        started = time.monotonic()
        while True:
            self._policy_changed.clear()
            left = started + self.policy.interval_s - time.monotonic()
            if left <= 0:
                return
            try:
                await asyncio.wait_for(self._policy_changed.wait(), left)
            except asyncio.TimeoutError:
                return

    async def set_policy(self, fields: dict) -> dict:
        """Validated merge into the running policy (ValueError names the field, or the profile file that
        mode static cannot use: the running policy stays)."""
        await self._wait_restored()  # restarted: first take back the policy the routers hold
        policy = self.policy.merge(fields)
        # later than any revision we hold, whatever this node's clock says against the last one's
        self._apply_policy(policy, max(time.time(), self.policy_revision + 1e-3))
        await self._wait_policy_held()
        return policy.model_dump()

    async def _wait_policy_held(self) -> None:
        """Until every router that is reporting holds the policy in force (its next report, ~0.5 s): a
        controller killed after the PUT answered still gets it back."""
        deadline = time.monotonic() + POLICY_HELD_TIMEOUT_S
        # only routers heard from lately: one that died counts as live for ROUTER_TIMEOUT_S, the PUT's whole bound
        while any(self.policy_held.get(r, 0.0) < self.policy_revision for r in self.state.live_routers(REPORTING_S)):
            if time.monotonic() > deadline:
                log.warning("controller: not every router holds the new policy after %.0f s; a controller "
                            "restart before they do falls back to the one they hold", POLICY_HELD_TIMEOUT_S)
                return
            await asyncio.sleep(0.05)

    async def _wait_restored(self) -> None:
        """A restarted controller: the routers' table confirmed, and a first report in (it brings back the
        policy set by PUT; without it a PUT merges into, and a view shows, the deployment's own)."""
        await self.state.wait_confirmed()
        while self.report_count == 0 and time.monotonic() - self._started < HEARD_TIMEOUT_S:
            await asyncio.sleep(0.05)

    def _apply_policy(self, policy: AutoscalePolicy, revision: float) -> None:
        """ValueError (the running policy stays) where the copies floor or a static profile refuse it."""
        check_copies(policy, self.rebalancer.min_copies)
        if policy.mode == "static":
            profile_loads(policy.profile_file, list(self.spec.moe_layers), self.spec.num_experts)
        self.policy, self.policy_revision = policy, revision
        self.rebalancer.set_policy(policy)
        self._policy_changed.set()

    # -- what the ingress shows ----------------------------------------------------------------
    async def ingress_report(self, replica: str, in_flight: int,
                             figures: metrics.IngressFigures | None = None) -> dict:
        """Called by every ingress replica every half second: its load and metric figures in, the cluster
        state out."""
        self.board.report(replica, in_flight, figures)
        table, live = self.state.table, self.state.live_routers()
        return self.board.state(table, down_workers(self.reports, live, table), len(live))

    async def admin(self, what: str) -> dict:
        await self._wait_restored()  # restarted: not the initial table or policy while the routers' are on their way
        live = self.state.live_routers()
        if what == "load":
            return load_view(self.reports, live, self.state.table, self.spec.moe_layers)
        if what == "autoscaler":
            return {"enabled": self.spec.policy is not None and self.policy.enabled, "policy": self.policy.model_dump(),
                    "history": self.rebalancer.history[-50:]}
        return cluster_stats(self.reports, live, self.state, self.spec, self.report_count)

    async def metrics_text(self, replica: str | None = None,
                           figures: metrics.IngressFigures | None = None) -> str:
        """The service's /metrics: the ingress figures summed over replicas (the asking replica's brought up
        to date first: a scrape right after a request sees it), then the cluster's."""
        if replica is not None:
            self.board.report_figures(replica, figures)
        update_metrics(self.reports, self.state.live_routers(), self.state, self.spec)
        return metrics.render_summed(self.board.figures()) + metrics.render(metrics.CLUSTER)

    # -- shutdown (moe-cluster serve on SIGTERM) -------------------------------------------------
    async def start_drain(self) -> None:
        self.board.start_drain()

    async def in_flight(self) -> int:
        return self.board.in_flight()

    async def cut(self) -> None:
        self.board.cut()


def _live_worker(table: Table, address: str) -> int | None:
    """The index of the worker serving at `address` (not retired), if the table has one."""
    return next((w for w, ref in enumerate(table.workers) if ref.address == address and not ref.retired), None)
