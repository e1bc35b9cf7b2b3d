"""The router: an engine host. Backbone + gating + continuous batching over its own KV cache,
fanning each MoE layer's rows out to the shared expert workers (deployments/experts/remote.py).

Many router replicas share one expert pool; each keeps the placement controller
informed and takes its tables through deployments/controller_link.py. Its only
request method is `generate`: a Serve call that admits the request and lasts until
it ends, while its outputs travel batched per step on the token stream to the
ingress replica that sent it (deployments/tokens/). The public APIs live in the
ingress (deployments/api/), and so do the client's errors: a router raises its engine's
errors or a RouterError (deployments/messages.py), never an HTTP status.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from typing import AsyncIterator

import ray
import torch
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from cluster.engine import InvalidRequest, LLMEngine
from cluster.engine.async_engine import AsyncEngine, EngineDeadError, SequenceFailed
from deployments.controller_link import ControllerLink
from deployments.experts import transport
from deployments.experts.remote import ExpertUnavailable, RemoteExperts
from deployments.messages import AppSpec, GenerateRequest, RouterError
from deployments.replica import replica_id
from deployments.tokens.publisher import TokenPublisher

log = logging.getLogger("ray.serve")
# What a router raises as it is: the engine's and the data plane's own errors (they pickle).
ENGINE_ERRORS = (InvalidRequest, SequenceFailed, EngineDeadError, ExpertUnavailable, RouterError)


def engine_error(e: BaseException) -> Exception:
    """What the ingress gets for `e`: the engine's own errors as they are, anything else as a
    RouterError that carries no text of it (a Ray actor error here is one this router hit)."""
    if isinstance(e, ENGINE_ERRORS):
        return e
    if isinstance(e, (RayActorError, ActorDiedError, ActorUnavailableError)):
        return RouterError("stopped", "the router serving this request stopped; retry the request")
    return RouterError("internal", "internal error")


async def coalesce(batches: AsyncIterator[list], size: int) -> AsyncIterator[list]:
    """The outputs of `batches` in lists of at least `size` (the first list at once, for the time to
    first token; the rest when `size` outputs are waiting, or the stream ends): each list is one
    message to the ingress and one write to the client, so a larger size means fewer of both."""
    waiting: list = []
    first = True
    async for batch in batches:
        waiting.extend(batch)
        if waiting and (first or len(waiting) >= size):
            yield waiting
            waiting, first = [], False
    if waiting:
        yield waiting


class Router:
    """Serve deployment (options applied in deployments/app.py)."""

    async def __init__(self, spec: AppSpec, controller):
        self.spec, self.cfg = spec, spec.cfg
        self.id, self.node = replica_id(), ray.get_runtime_context().get_node_id()
        if self.cfg.routers.torch_threads:
            torch.set_num_threads(self.cfg.routers.torch_threads)
        self.link = ControllerLink(spec, controller, self.id, self.node)
        self.remote = None
        if spec.placement is not None:  # the table comes after the engine is built (that can take minutes)
            connect = functools.partial(transport.connect, node_id=self.node, device=self.cfg.routers.device,
                                        secret=spec.data_plane_secret, prefer=self.cfg.data_plane_transport)
            self.remote = RemoteExperts(None, connect, node_id=self.node,
                                        call_timeout_s=self.cfg.expert_call_timeout_s,
                                        on_down=lambda worker, generation: self.link.report_soon())
        engine = LLMEngine.from_pretrained(self.cfg.model, device=self.cfg.routers.device, experts=self.remote,
                                           **self.cfg.engine_options())
        log.info("router %s: %s", self.id, engine.memory)
        self.engine = AsyncEngine(engine, step_delay_s=self.cfg.engine_step_delay_s,
                                  on_idle=self.remote.begin_step if self.remote else None)
        self.publisher = TokenPublisher(spec.data_plane_secret, self.cfg.stream_interval)
        self.engine.on_delivered = self.publisher.flush  # one message per ingress replica per step
        self.link.attach(self.engine, self.remote)
        if self.remote is not None:
            self.remote.adopt(await self.link.first_table())
            self.remote.begin_step()
        await self.link.report_once()  # the controller knows this router's version before any request
        self._reporter = asyncio.get_running_loop().create_task(self.link.run_forever())

    # -- requests -----------------------------------------------------------------------------
    async def generate(self, req: GenerateRequest):
        """Yields an empty list once the request is admitted, then lasts until it ends: its outputs go
        on the token stream to `req.reply_to`. Errors are the engine's or RouterErrors (`engine_error`),
        raised before that first yield when the request cannot start. Cancelling the call aborts the
        request (its KV slot is freed). Without `reply_to` the outputs come in this call instead, as
        lists of StepOutput."""
        self._admit(req)
        with self.engine.admission():  # counted from here (no await since the check) to the end
            try:
                yield []  # admitted: the ingress can send its response headers now
                if req.reply_to is None:
                    async for batch in self._in_band(req):
                        yield batch
                else:
                    await self._streamed(req)
            except Exception as e:  # noqa: BLE001 - every failure reaches the ingress in the engine's terms
                raise engine_error(e) from None

    async def _streamed(self, req: GenerateRequest) -> None:
        done = asyncio.get_running_loop().create_future()
        stream = self.publisher.open(req.request_id, req.reply_to, req.skip, done)
        try:
            self.engine.start(req.request_id, req.prompt_ids, req.params, stream.deliver, checked=True)
            await done
        finally:
            # Cancelled (the client left, the ingress gave up): the await cancelled `done` too.
            if not done.done() or done.cancelled():
                self.engine.abort(req.request_id)
                stream.close(None)

    async def _in_band(self, req: GenerateRequest):
        skip = req.skip
        async with contextlib.aclosing(self.engine.generate(req.prompt_ids, req.params, checked=True)) as outputs:
            async for batch in coalesce(outputs, self.cfg.stream_interval):
                if skip:
                    drop = min(skip, len(batch))
                    batch, skip = batch[drop:], skip - drop
                if batch:
                    yield batch

    def _admit(self, req: GenerateRequest) -> None:
        """The checks, in the same synchronous step as `generate` enters `engine.admission()`: a burst
        cannot overshoot the queue limit. The engine owns the count of this process's work in flight."""
        if not self.engine.alive:
            raise RouterError("stopped", "this router's engine stopped; retry the request")
        if self.remote is not None and self.remote.uncovered():
            n = len(self.remote.uncovered())
            raise RouterError("uncovered", f"{n} expert(s) have no live copy right now (worker down); retry shortly")
        if self.engine.admitted >= self.cfg.max_num_seqs + self.cfg.max_queued_requests:
            raise RouterError("full", f"server overloaded: {self.engine.admitted} requests in progress; retry later")
        try:
            self.engine.validate(req.prompt_ids, req.params)  # this process's one check (cluster/engine/prompts.py)
        except Exception as e:  # noqa: BLE001
            raise engine_error(e) from None

    def check_health(self) -> None:
        """Serve's liveness probe: a dead engine loop gets this replica replaced."""
        if not self.engine.alive:
            raise RuntimeError(f"engine loop is not running: {self.engine.died}")

    def stats(self) -> dict:
        return self.link.stats()
