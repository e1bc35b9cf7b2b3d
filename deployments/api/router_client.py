"""The ingress's way to a router: one `generate` call per choice over a Serve handle
(power-of-two-choices over the router replicas' queues), which admits the request and
lasts until it ends; its outputs arrive batched per router step on this ingress
replica's token sink (deployments/tokens/), which puts them straight into the
request's queue. The task that holds the call wakes for its admission, its end and
its failure, never per token.

If the router serving a request dies, the request moves to another router and
resumes where the client is: the new router replays it (every request carries a
seed, so greedy and sampled requests replay exactly) and skips what was already
delivered. No request is lost to one router's death.
"""
from __future__ import annotations

import asyncio
import logging
import uuid

from ray.exceptions import RayActorError

from cluster.engine import SamplingParams
from deployments import metrics
from deployments.api.errors import ApiError, classify
from deployments.messages import GenerateRequest
from deployments.tokens.sink import TokenSink

log = logging.getLogger("ray.serve")
MAX_RESUMES = 3
RESUME_BACKOFF_S = 0.5


def _router_died(exc: BaseException) -> bool:
    if isinstance(exc, RayActorError):
        return True
    cause = getattr(exc, "cause", None)
    return isinstance(cause, RayActorError) or type(exc).__name__ in ("ActorDiedError", "ActorUnavailableError")


class RouterClient:
    def __init__(self, routers, sink: TokenSink):
        self.routers = routers.options(stream=True)
        self.sink = sink

    def start(self, index: int, prompt_ids: list[int], params: SamplingParams, out: asyncio.Queue) -> "ChoiceRun":
        return ChoiceRun(self, index, prompt_ids, params, out)


class ChoiceRun:
    """One choice on some router. Puts (index, [StepOutput, ...]) into `out` as the token sink delivers
    them, and (index, ApiError) if it fails after admission; `admitted` resolves once its router has
    admitted it (or fails with the reason it cannot start)."""

    def __init__(self, client: RouterClient, index: int, prompt_ids: list[int], params: SamplingParams,
                 out: asyncio.Queue):
        self.client, self.index, self.prompt_ids, self.params, self.out = client, index, prompt_ids, params, out
        self.delivered = 0  # outputs that reached the client's queue: skipped when resuming elsewhere
        self.request_id = ""
        self.admitted: asyncio.Future = asyncio.get_running_loop().create_future()
        self.task = asyncio.ensure_future(self._run())

    def _deliver(self, outputs: list) -> None:
        self.delivered += len(outputs)
        self.out.put_nowait((self.index, outputs))

    async def _run(self) -> None:
        resumes = 0
        while True:
            self.client.sink.unregister(self.request_id)
            self.request_id = uuid.uuid4().hex  # per attempt: a dead router's late outputs are dropped
            self.client.sink.register(self.request_id, self._deliver)
            call = self.client.routers.generate.remote(GenerateRequest(
                self.prompt_ids, self.params, skip=self.delivered, request_id=self.request_id,
                reply_to=self.client.sink.address))
            ended = False
            try:
                await _admitted(call)
                if not self.admitted.done():
                    self.admitted.set_result(None)
                async for _ in call:  # lasts until the request ends; the outputs come on the token stream
                    pass
                ended = True
                return
            except Exception as e:  # noqa: BLE001 - router death is retried; the rest is the client's error
                if not _router_died(e) or resumes >= MAX_RESUMES:
                    self._fail(e)
                    ended = True
                    return
                resumes += 1
                metrics.RESUMED.inc()
                log.warning("router died mid-request; resuming on another (%d tokens delivered)", self.delivered)
                await asyncio.sleep(RESUME_BACKOFF_S * resumes)
            finally:
                if not ended:
                    call.cancel()  # the client left, timed out or failed: free the router's slot

    def _fail(self, e: Exception) -> None:
        if self.admitted.done():
            self.out.put_nowait((self.index, classify(e)))
        else:
            self.admitted.set_exception(e)

    async def close(self) -> None:
        """The request is over (done, failed or abandoned): cancel the call if it still runs."""
        self.client.sink.unregister(self.request_id)
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        if self.admitted.done() and not self.admitted.cancelled():
            self.admitted.exception()  # retrieved: a failure already raised by whoever awaited it
        else:
            self.admitted.cancel()


async def _admitted(call) -> list:
    """The call's first item (an empty list once the router admitted the request)."""
    async for item in call:
        return item
    raise ApiError(500, "generation ended without output")
