"""The router: an engine host. Backbone + gating + continuous batching over its own KV cache,
fanning each MoE layer's rows out to the shared expert workers (deployments/experts/remote.py).

Many router replicas share one expert pool. Each reports its expert load to the
placement controller every `REPORT_INTERVAL_S` and takes the newest placement
table from the reply, switching at a step boundary. Traffic never depends on
the controller: with it gone, a router keeps routing by its last table.

Its only request method is `generate` (a stream of per-step output batches);
the public APIs live in the ingress (deployments/api/).
"""
from __future__ import annotations

import asyncio
import logging
import time

import ray
from ray import serve

from cluster.engine import LLMEngine
from cluster.engine.async_engine import AsyncEngine
from deployments.api.errors import ApiError, classify, overloaded
from deployments.experts.remote import RemoteExperts
from deployments.experts.transport.grpc import GrpcTransport
from deployments.messages import AppSpec, ControllerReply, GenerateRequest, RouterReport

log = logging.getLogger("ray.serve")
REPORT_INTERVAL_S = 0.5
CONTROLLER_TIMEOUT_S = 5.0


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside Serve (tests)
        return f"router-{id(object())}"


class Router:
    """Serve deployment (options applied in deployments/app.py)."""

    async def __init__(self, spec: AppSpec, controller):
        self.spec, self.cfg, self.controller = spec, spec.cfg, controller
        self.id, self.node = _replica_id(), ray.get_runtime_context().get_node_id()
        self.remote = None
        if spec.placement is not None:
            table = await self._first_table()
            secret = spec.data_plane_secret
            self.remote = RemoteExperts(table, lambda ref: GrpcTransport(ref.address, secret), node_id=self.node,
                                        call_timeout_s=self.cfg.expert_call_timeout_s, on_down=self._worker_down)
        engine = LLMEngine.from_pretrained(self.cfg.model, device=self.cfg.routers.device, experts=self.remote,
                                           **self.cfg.engine_options())
        log.info("router %s: %s", self.id, engine.memory)
        self.engine = AsyncEngine(engine, step_delay_s=self.cfg.engine_step_delay_s,
                                  on_idle=self.remote.begin_step if self.remote else None)
        self._loop = asyncio.get_running_loop()
        self._report_now = asyncio.Event()
        self._send_table = False
        self._reporter = self._loop.create_task(self._report_forever())

    async def _first_table(self, limit_s: float = 120.0):
        """From the controller of this build (a rolling update may route to the previous one first)."""
        deadline = time.monotonic() + limit_s
        while True:
            try:
                return await self.controller.current_table.remote(self.spec.build_id)
            except Exception:  # noqa: BLE001 - the other build's controller, or ours not up yet
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    # -- requests -----------------------------------------------------------------------------
    async def generate(self, req: GenerateRequest):
        """Yields lists of StepOutput (everything since the last yield: one message per step at most),
        after an empty list that says the request was admitted. Errors are ApiErrors, raised before
        that first yield when the request cannot start."""
        self._check_capacity()
        try:
            self.engine.engine.validate(req.prompt_ids, req.params)  # e.g. longer than this router's KV cache
        except Exception as e:  # noqa: BLE001
            raise classify(e) from None
        yield []  # admitted: the ingress can send its response headers now
        skip = req.skip
        try:
            async for batch in self.engine.generate(req.prompt_ids, req.params):
                if skip:
                    drop = min(skip, len(batch))
                    batch, skip = batch[drop:], skip - drop
                if batch:
                    yield batch
        except ApiError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure reaches the client as an ApiError
            raise classify(e) from None

    def _check_capacity(self) -> None:
        if not self.engine.alive:
            raise ApiError(503, "this router's engine stopped; retry the request")
        if self.remote is not None and self.remote.uncovered():
            n = len(self.remote.uncovered())
            raise ApiError(503, f"{n} expert(s) have no live copy right now (worker down); retry shortly")
        if self.engine.active >= self.cfg.max_num_seqs + self.cfg.max_queued_requests:
            raise overloaded(f"server overloaded: {self.engine.active} requests in progress; retry later")

    def check_health(self) -> None:
        """Serve's liveness probe: a dead engine loop gets this replica replaced."""
        if not self.engine.alive:
            raise RuntimeError(f"engine loop is not running: {self.engine.died}")

    def stats(self) -> dict:
        data_plane = None
        if self.remote:
            data_plane = {**self.remote.stats.snapshot(), "local_workers": sorted(self.remote.local)}
        return {"router": self.id, "node_id": self.node, **self.engine.stats(), "data_plane": data_plane,
                "table_version": self.remote.table.version if self.remote else None}

    # -- the controller ------------------------------------------------------------------------
    def _worker_down(self, worker: int, generation: int) -> None:
        """From the engine thread: tell the controller at once (it heals the worker)."""
        self._loop.call_soon_threadsafe(self._report_now.set)

    def _report(self) -> RouterReport:
        load = self.engine.engine.expert_load
        snapshot = load.snapshot()
        coactivation = None
        if self.spec.policy is not None and self.spec.policy.co_activation:
            coactivation = load.coactivation_counts().tolist()
        remote = self.remote
        return RouterReport(self.spec.build_id, self.id, self.node, remote.table.version if remote else -1,
                            snapshot["ema_tokens_per_step"], snapshot["total_tokens"], coactivation,
                            tuple(remote.down_workers()) if remote else (), self.stats(),
                            remote.table if remote and self._send_table else None)

    async def _report_once(self) -> None:
        reply: ControllerReply | None = await asyncio.wait_for(self.controller.report.remote(self._report()),
                                                               CONTROLLER_TIMEOUT_S)
        if reply is None:
            return  # the other build's controller (rolling update): ours answers the next report
        self._send_table = reply.send_table
        if self.remote is not None:
            if reply.table is not None:
                self.remote.adopt(reply.table)
            self.remote.token_split = reply.settings.token_split
        self.engine.engine.expert_load.alpha = reply.settings.ema_alpha

    async def _report_forever(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._report_now.wait(), REPORT_INTERVAL_S)
            except asyncio.TimeoutError:
                pass
            self._report_now.clear()
            t0 = time.monotonic()
            try:
                await self._report_once()
            except Exception as e:  # noqa: BLE001 - the controller may be restarting: keep the last table
                log.info("router %s: controller unreachable (%s); keeping table", self.id, type(e).__name__)
                await asyncio.sleep(max(0.0, REPORT_INTERVAL_S - (time.monotonic() - t0)))
