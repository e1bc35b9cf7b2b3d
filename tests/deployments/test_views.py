"""The controller's side without Serve, in process: the cluster view over the routers' reports,
the ingress board, the table-version protocol of `PlacementController.report` and
`ControllerLink.report_once` (a router's side), and a policy change. No Ray, no model."""
import asyncio
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from cluster.expert_load import ExpertLoadTracker
from cluster.placement import Placement, Table, WorkerRef
from deployments import cluster_view, ingress_board
from deployments.controller import PlacementController, _live_worker
from deployments.controller_link import ControllerLink
from deployments.experts.remote import RemoteExperts
from deployments.ingress_board import IngressBoard
from deployments.membership import Membership
from deployments.messages import AppSpec, ControllerReply, RouterReport, RouterSettings
from deployments.policy import AutoscalePolicy
from deployments.table_state import TableState

LAYERS = (1, 2)
PLACEMENT = Placement((((1, 0), (2, 0), (1, 1)), ((1, 1), (2, 1))))  # expert (1, 1) has two copies
REFS = (WorkerRef("a:1", "node-a"), WorkerRef("b:1", "node-b", generation=2))
TABLE = Table(3, PLACEMENT, REFS)
SPEC = AppSpec("build-1", None, PLACEMENT, AutoscalePolicy(copy_choice="least_loaded", window_steps=9), "s3cret",
               LAYERS, 2, 100)


def _report(router: str, load, *, version: int = 3, down=(), build: str = "build-1", stats=None,
            table: Table | None = None, settings: RouterSettings | None = None) -> RouterReport:
    load = np.asarray(load, dtype=float)
    return RouterReport(build, router, "node-a", version, load.tolist(), (load * 10).astype(int).tolist(), None,
                        tuple(down), stats or {}, table, settings)


# -- the cluster view ------------------------------------------------------------------------
def test_expert_load_sums_the_live_routers_only():
    reports = {"r1": _report("r1", [[1, 2], [3, 4]]), "r2": _report("r2", [[1, 0], [0, 1]]),
               "gone": _report("gone", [[100, 100], [100, 100]])}
    loads, coactivation = cluster_view.expert_load(reports, ["r1", "r2"])
    assert loads.tolist() == [[2, 2], [3, 5]] and coactivation is None


def test_a_down_worker_counts_until_its_generation_is_healed():
    reports = {"r1": _report("r1", [[1, 1], [1, 1]], down=[(0, 0), (1, 1)])}  # worker 1 is generation 2 now
    assert cluster_view.down_workers(reports, ["r1"], TABLE) == {0}
    assert cluster_view.down_workers(reports, [], TABLE) == set()  # a router that stopped reporting
    assert cluster_view.down_workers(reports, ["r1"], None) == set()  # experts in process


def test_load_view_shows_layers_placement_and_tokens_per_router():
    reports = {"r1": _report("r1", [[3, 1], [2, 2]])}
    view = cluster_view.load_view(reports, ["r1"], TABLE, LAYERS)
    assert view["load"]["layers"] == [1, 2] and view["load"]["ema_tokens_per_step"] == [[3, 1], [2, 2]]
    assert view["load"]["max_over_mean"] == pytest.approx([1.5, 1.0])
    assert view["placement"] == {"version": 3, "workers": [[[1, 0], [2, 0], [1, 1]], [[1, 1], [2, 1]]]}
    assert view["tokens_per_router"] == {"r1": 80} and view["routers"] == 1
    assert cluster_view.load_view(reports, [], TABLE, LAYERS) == {"load": None, "placement": None, "routers": 0}


def test_cluster_stats_add_up_the_routers_data_planes():
    plane = {"calls": 4, "failovers": 1, "failures": {"UNAVAILABLE": 2}, "calls_per_worker": {"0": 3, "1": 1}}
    reports = {r: _report(r, [[1, 1], [1, 1]], stats={"running": 2, "waiting": 1, "data_plane": plane})
               for r in ("r1", "r2")}
    stats = cluster_view.cluster_stats(reports, ["r1", "r2"], TableState(TABLE), SPEC, report_count=7)
    assert stats["running"] == 4 and stats["waiting"] == 2 and stats["controller_reports"] == 7
    dp = stats["data_plane"]
    assert dp["calls"] == 8 and dp["failovers"] == 2 and dp["failures"] == {"UNAVAILABLE": 4}
    assert dp["calls_per_worker"] == {"0": 6, "1": 2}
    assert dp["copies_per_worker"] == [3, 2] and dp["bytes_per_worker"] == [300, 200] and dp["copies"] == 5
    assert dp["worker_nodes"] == ["node-a", "node-b"] and dp["retired_workers"] == [] and dp["table_version"] == 3
    # even load, expert (1, 1) split over both workers: layer 1 gives worker 0 1.5 of 2 tokens
    assert dp["worker_max_over_mean"] == [1.5, 1.0]
    assert cluster_view.cluster_stats(reports, ["r1"], TableState(None), SPEC, 0)["data_plane"] is None


# -- the ingress board -----------------------------------------------------------------------
def test_the_board_counts_recent_reports_and_says_why_not_ready(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(ingress_board.time, "monotonic", lambda: clock[0])
    board = IngressBoard()
    board.report("i1", 3)
    clock[0] += ingress_board.INGRESS_TIMEOUT_S - 1
    board.report("i2", 2)
    assert board.in_flight() == 5
    clock[0] += 2  # i1 is silent past the timeout: its requests no longer count
    assert board.in_flight() == 2
    assert board.state(TABLE, set(), routers_up=1)["ready"] is True
    assert board.state(TABLE, set(), routers_up=0)["reason"] == "no router is up"
    assert board.state(TABLE, {1}, routers_up=1)["reason"] == "1 expert(s) without a live copy"  # (2, 1) only
    board.start_drain()
    assert board.state(TABLE, set(), routers_up=1) == {"ready": False, "reason": "draining", "draining": True,
                                                       "cut_off": False}
    board.cut()
    assert board.state(None, set(), routers_up=1)["cut_off"] is True


# -- the controller's side of the table-version protocol ---------------------------------------
async def _controller(monkeypatch) -> PlacementController:
    async def fixed_refs(self, limit_s=600.0):
        return REFS

    monkeypatch.setattr(Membership, "fixed_refs", fixed_refs)
    monkeypatch.setattr("deployments.table_state.CONFIRM_GRACE_S", 0.0)  # no router ahead of it here
    monkeypatch.setattr("deployments.controller.HEARD_TIMEOUT_S", 0.0)  # nor one whose report is on its way
    controller = PlacementController.__new__(PlacementController)
    await controller.__init__(SPEC, [])  # Serve awaits the async __init__ the same way
    controller._loop_task.cancel()  # the policy loop is the Rebalancer's, tested in test_rebalancer.py
    return controller


def test_the_controller_answers_each_report_by_version(monkeypatch):
    async def run():
        c = await _controller(monkeypatch)
        settings = RouterSettings(copy_choice="least_loaded", ema_alpha=0.2)
        behind = await c.report(_report("r1", [[1, 1], [1, 1]], version=0))
        assert behind == ControllerReply(c.state.table, settings, send_table=False)  # the newer table, v1
        assert await c.report(_report("r1", [[1, 1], [1, 1]], version=1)) == ControllerReply(None, settings)
        assert await c.report(_report("r2", [[1, 1], [1, 1]], build="build-0")) is None  # rolling update
        ahead = await c.report(_report("r2", [[1, 1], [1, 1]], version=3))
        assert ahead.send_table and ahead.table is None  # a restarted controller asks for the router's table
        restored = await c.report(_report("r2", [[1, 1], [1, 1]], version=3, table=TABLE))
        assert c.state.table == TABLE and c.state.restored and restored.table is None
        assert c.report_count == 4 and sorted(c.reports) == ["r1", "r2"]

    asyncio.run(run())


def test_a_restarted_controller_shows_the_routers_table_not_its_initial_one(monkeypatch):
    """/admin/load answered for ~0.5 s after a restart with the initial table v1 and its workers."""
    async def run():
        c = await _controller(monkeypatch)
        await c.report(_report("r1", [[1, 1], [1, 1]], version=3))  # a router ahead: we restarted
        view = asyncio.get_running_loop().create_task(c.admin("load"))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not view.done()
        await c.report(_report("r1", [[1, 1], [1, 1]], version=3, table=TABLE))
        assert (await asyncio.wait_for(view, 5))["placement"]["version"] == 3

    asyncio.run(run())


def test_a_policy_change_validates_merges_and_reaches_the_rebalancer(monkeypatch):
    async def run():
        c = await _controller(monkeypatch)
        out = await c.set_policy({"token_split": "even", "min_gain": 0.5})  # an old key, still accepted
        assert out["copy_choice"] == "even" and out["min_gain"] == 0.5 and c.rebalancer.policy is c.policy
        with pytest.raises(ValueError, match="interval_s: Input should be greater than 0"):
            await c.set_policy({"interval_s": -1})
        assert c.policy.min_gain == 0.5

    asyncio.run(run())


async def _put(c: PlacementController, fields: dict, applied) -> asyncio.Task:
    """A PUT /admin/policy under way, once the controller has applied it (its answer waits for the routers)."""
    put = asyncio.get_running_loop().create_task(c.set_policy(fields))
    await _until(lambda: applied(c.policy))
    return put


async def _until(ok) -> None:
    for _ in range(500):
        if ok():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("not within 5 s")


def test_a_restarted_controller_takes_back_the_policy_set_by_put_from_the_routers(monkeypatch, tmp_path):
    """It came back with the deployment's policy: an operator's `enabled: false` or static mode was lost
    silently when Serve restarted the controller."""
    def _seen(router, settings):  # a router that routes by the controller's table, holding `settings`
        return _report(router, [[1, 1], [1, 1]], version=1, settings=settings)

    async def run():
        old = await _controller(monkeypatch)
        await old.set_policy({"min_gain": 0.3, "cooldown_s": 77})
        held = (await old.report(_seen("r1", None))).settings  # what every router keeps
        assert held.policy["min_gain"] == 0.3 and held.revision > 0

        new = await _controller(monkeypatch)  # Serve's replacement: the deployment's policy
        assert new.policy.min_gain != 0.3
        reply = await new.report(_seen("r1", held))
        assert (new.policy.min_gain, new.policy.cooldown_s, new.rebalancer.policy) == (0.3, 77, new.policy)
        assert reply.settings == held  # and the routers it answers get it too
        older = RouterSettings(policy={**held.policy, "min_gain": 0.9}, revision=held.revision - 1)
        await new.report(_seen("r2", older))  # a router that missed the last PUT
        assert new.policy.min_gain == 0.3

        monkeypatch.setattr("deployments.controller.time.time", lambda: held.revision - 100)  # this node's clock lags
        monkeypatch.setattr("deployments.controller.POLICY_HELD_TIMEOUT_S", 600.0)  # only the routers end the wait
        monkeypatch.setattr("deployments.controller.REPORTING_S", 600.0)  # and r2 is waited for, however slow we are
        put = await _put(new, {"min_gain": 0.4}, lambda p: p.min_gain == 0.4)
        assert new.policy_revision > held.revision  # so the routers take it, and no report brings 0.3 back
        assert not put.done()  # the PUT answers once every live router holds it: a kill right after loses nothing
        latest = (await new.report(_seen("r1", held))).settings
        assert new.policy.min_gain == 0.4 and latest.policy["min_gain"] == 0.4
        await new.report(_seen("r1", latest))
        await asyncio.sleep(0.1)
        assert not put.done()  # r2 has not reported since
        await new.report(_seen("r2", latest))
        assert (await asyncio.wait_for(put, 5))["min_gain"] == 0.4

        gone = RouterSettings(policy={**held.policy, "mode": "static", "profile_file": str(tmp_path / "gone.json")},
                              revision=new.policy_revision + 1)
        await new.report(_seen("r1", gone))  # its profile was deleted meanwhile
        assert new.policy.mode == "online" and new.policy.min_gain == 0.4  # logged, not applied

    asyncio.run(run())


def test_a_put_merges_into_the_policy_the_routers_bring_back_to_a_restarted_controller(monkeypatch):
    """A PUT that reached a restarted controller before any router's report merged into the deployment's
    policy: the operator's earlier PUT (here min_gain 0.3) was lost for good."""
    async def run():
        old = await _controller(monkeypatch)
        await old.set_policy({"min_gain": 0.3})
        held = (await old.report(_report("r1", [[1, 1], [1, 1]], version=1))).settings

        new = await _controller(monkeypatch)
        monkeypatch.setattr("deployments.controller.HEARD_TIMEOUT_S", 600.0)
        put = asyncio.get_running_loop().create_task(new.set_policy({"cooldown_s": 5}))
        await asyncio.sleep(0.2)
        assert not put.done() and new.policy.cooldown_s != 5  # no report yet: nothing to merge into
        await new.report(_report("r1", [[1, 1], [1, 1]], version=1, settings=held))
        await _until(lambda: new.policy.cooldown_s == 5)
        latest = (await new.report(_report("r1", [[1, 1], [1, 1]], version=1, settings=held))).settings
        await new.report(_report("r1", [[1, 1], [1, 1]], version=1, settings=latest))
        out = await asyncio.wait_for(put, 30)
        assert (out["min_gain"], out["cooldown_s"]) == (0.3, 5)

    asyncio.run(run())


def test_a_put_waits_for_the_routers_that_report_not_for_one_gone_silent(monkeypatch):
    """A router dead for 2 s still counts as live (ROUTER_TIMEOUT_S 5): the PUT waited for it to the end
    of its bound, which with a restart's wait came close to the admin call's 10 s."""
    async def run():
        c = await _controller(monkeypatch)
        await c.report(_report("r1", [[1, 1], [1, 1]], version=1))
        await c.report(_report("r2", [[1, 1], [1, 1]], version=1))
        # r2 went silent long ago yet counts as live; r1 counts as reporting however slow this machine is
        c.state.routers["r2"].last_seen -= 120.0
        monkeypatch.setattr("deployments.table_state.ROUTER_TIMEOUT_S", 600.0)
        monkeypatch.setattr("deployments.controller.REPORTING_S", 60.0)
        monkeypatch.setattr("deployments.controller.POLICY_HELD_TIMEOUT_S", 600.0)  # only the routers end the wait
        put = await _put(c, {"min_gain": 0.4}, lambda p: p.min_gain == 0.4)
        await asyncio.sleep(0.1)
        assert not put.done()  # r1, which reports, does not hold it yet
        latest = (await c.report(_report("r1", [[1, 1], [1, 1]], version=1))).settings
        await c.report(_report("r1", [[1, 1], [1, 1]], version=1, settings=latest))
        assert (await asyncio.wait_for(put, 30))["min_gain"] == 0.4

    asyncio.run(run())


def test_a_lower_interval_takes_effect_at_once_and_infinity_is_refused(monkeypatch):
    """After PUT interval_s 3600 then 1, the loop slept out the 3600 s. PUT interval_s Infinity was applied,
    then its answer failed (500: not JSON) and every later view with it, across a controller restart too."""
    async def run():
        c = await _controller(monkeypatch)
        await c.set_policy({"interval_s": 3600})
        looked = []
        monkeypatch.setattr(c.state, "forget_gone", lambda: looked.append(1))
        loop = asyncio.get_running_loop().create_task(c._policy_forever())
        await asyncio.sleep(0.05)
        await c.set_policy({"interval_s": 0.01})
        await _until(lambda: len(looked) >= 2)
        await c.set_policy({"interval_s": 0.3})
        seen = len(looked)
        for _ in range(5):  # PUTs of other fields, more often than the interval: the loop still looks
            await c.set_policy({"min_gain": 0.1})
            await asyncio.sleep(0.1)
        await _until(lambda: len(looked) > seen)
        loop.cancel()
        for bad in (float("inf"), "1e999", float("nan")):
            with pytest.raises(ValueError, match="interval_s"):
                await c.set_policy({"interval_s": bad})
        with pytest.raises(ValueError, match="enabled"):
            await c.set_policy({"enabled": "yes"})  # no guessing at what "yes" meant
        assert c.policy.interval_s == 0.3 and c.policy.enabled

    asyncio.run(run())


def test_the_apps_expert_copies_reach_the_planner_as_its_floor(monkeypatch):
    from dataclasses import replace

    from deployments.config import app_config

    monkeypatch.setattr(sys.modules[__name__], "SPEC", replace(SPEC, cfg=app_config({"expert_copies": 2})))

    async def run():
        c = await _controller(monkeypatch)
        assert c.rebalancer.min_copies == 2  # Rebalancer.decide passes it to the planner's Limits
        with pytest.raises(ValueError, match="would retire the copies expert_copies"):
            await c.set_policy({"mode": "static", "profile_file": "p.json"})

    asyncio.run(run())


def test_mode_static_is_refused_with_a_profile_it_cannot_use_and_the_running_policy_stays(monkeypatch, tmp_path):
    """It was accepted, then the policy loop failed on it every interval: a 200 for a policy that never ran."""
    from cluster.profile import save_profile

    save_profile(tmp_path / "other.json", np.ones((len(LAYERS), 3)), LAYERS)  # another model's: 3 experts
    save_profile(tmp_path / "mine.json", np.ones((len(LAYERS), 2)), LAYERS)

    async def run():
        c = await _controller(monkeypatch)
        before = c.policy
        for name, reason in (("nope.json", "cannot read load profile"), ("other.json", "× 3 experts")):
            with pytest.raises(ValueError, match=reason) as e:
                await c.set_policy({"mode": "static", "profile_file": str(tmp_path / name)})
            assert str(tmp_path / name) in str(e.value)
            assert c.policy is before and c.rebalancer.policy is before
        out = await c.set_policy({"mode": "static", "profile_file": str(tmp_path / "mine.json")})
        assert out["mode"] == "static" and c.rebalancer.policy.profile_file == str(tmp_path / "mine.json")

    asyncio.run(run())


def test_live_worker_skips_retired_ones():
    table = Table(1, PLACEMENT, (REFS[0], WorkerRef("b:1", retired=True)))
    assert _live_worker(table, "a:1") == 0 and _live_worker(table, "b:1") is None and _live_worker(table, "c:1") is None


# -- the router's side ---------------------------------------------------------------------------
class _Controller:
    """Answers each report with the next reply given; keeps what it was sent."""

    def __init__(self, *replies):
        self.replies, self.sent = list(replies), []
        self.report = SimpleNamespace(remote=self._report)

    async def _report(self, report):
        self.sent.append(report)
        return self.replies.pop(0)


def _engine(tracker):
    return SimpleNamespace(expert_load_report=tracker.report, stats=lambda: {"running": 0},
                           set_expert_load_window=tracker.set_alpha)


def test_the_router_keeps_the_newest_policy_it_was_sent_and_reports_it():
    put = RouterSettings("least_loaded", 0.25, {"min_gain": 0.3}, revision=50.0)
    controller = _Controller(ControllerReply(None, put),
                             ControllerReply(None, RouterSettings("even", 0.5)),  # restarted, not restored yet
                             ControllerReply(None, put))

    async def run():
        link = ControllerLink(SPEC, controller, "r1", "node-a")
        tracker = ExpertLoadTracker(LAYERS, 2)
        remote = RemoteExperts(TABLE, lambda ref: None, node_id="node-a")
        link.attach(_engine(tracker), remote)
        for _ in range(3):
            await link.report_once()
        assert controller.sent[0].settings == RouterSettings()
        assert controller.sent[1].settings == put and controller.sent[2].settings == put
        assert link.settings == put and remote.copy_choice == "least_loaded" and tracker.alpha == 0.25

    asyncio.run(run())


def test_the_router_adopts_a_newer_table_at_its_next_step_and_applies_the_settings():
    newer = TABLE.changed()
    controller = _Controller(ControllerReply(newer, RouterSettings("least_loaded", 0.25)),
                             None,  # the other build's controller: nothing changes
                             ControllerReply(None, RouterSettings("even", 0.25), send_table=True),
                             ControllerReply(None, RouterSettings("even", 0.25)))

    async def run():
        link = ControllerLink(SPEC, controller, "r1", "node-a")
        tracker = ExpertLoadTracker(LAYERS, 2)
        remote = RemoteExperts(TABLE, lambda ref: None, node_id="node-a")
        link.attach(_engine(tracker), remote)
        await link.report_once()
        first = controller.sent[0]
        assert (first.router_id, first.node_id, first.table_version, first.table) == ("r1", "node-a", 3, None)
        assert first.stats["data_plane"]["same_node_workers"] == [0] and first.stats["table_version"] == 3
        assert first.coactivation is None and np.shape(first.expert_load) == (2, 2)  # the policy does not co-locate
        assert tracker.report(co_activation=True)[2].shape == (2, 2, 2)
        assert remote.table.version == 3 and remote.copy_choice == "least_loaded" and tracker.alpha == 0.25
        remote.begin_step()  # tables switch only at a step boundary
        assert remote.table == newer
        await link.report_once()
        assert remote.copy_choice == "least_loaded"
        await link.report_once()  # asked for: the next report carries the router's table
        await link.report_once()
        assert controller.sent[3].table == newer and controller.sent[3].table_version == 4

    asyncio.run(run())
