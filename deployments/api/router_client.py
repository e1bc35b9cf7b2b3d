"""The ingress's way to a router: one `generate` call per choice over a Serve handle
(power-of-two-choices over the router replicas' queues), which admits the request and
lasts until it ends; its outputs arrive batched per router step on this ingress
replica's token sink (deployments/tokens/), into the request's queue.

If the router serving a request dies, the request moves to another router and
resumes where the client is: the new router replays it (every request carries a
seed, so greedy and sampled requests replay exactly) and skips what was already
delivered. No request is lost to one router's death.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from typing import AsyncIterator

from ray.exceptions import RayActorError

from cluster.engine import SamplingParams
from deployments import metrics
from deployments.api.errors import ApiError
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

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[list]:
        """Batches of StepOutput until the request finishes (first an empty one: admitted); ApiError
        on failure."""
        delivered, resumes = 0, 0
        while True:
            request_id = uuid.uuid4().hex  # per attempt: a dead router's late outputs are dropped
            outputs: asyncio.Queue = asyncio.Queue()
            self.sink.register(request_id, outputs.put_nowait)
            call = self.routers.generate.remote(GenerateRequest(prompt_ids, params, skip=delivered,
                                                                request_id=request_id, reply_to=self.sink.address))
            watcher, finished = None, False
            try:
                yield await _admitted(call)
                watcher = asyncio.ensure_future(_watch(call, outputs))
                while not finished:
                    batch, finished = _take([await outputs.get()], outputs)
                    delivered += len(batch)
                    yield batch
                return
            except Exception as e:  # noqa: BLE001 - router death is retried; the rest is the client's error
                if not _router_died(e) or resumes >= MAX_RESUMES:
                    raise
                resumes += 1
                metrics.RESUMED.inc()
                log.warning("router died mid-request; resuming on another (%d tokens delivered)", delivered)
                await asyncio.sleep(RESUME_BACKOFF_S * resumes)
            finally:
                self.sink.unregister(request_id)
                if watcher is not None:
                    watcher.cancel()
                if not finished:
                    call.cancel()  # the client left, timed out or failed: free the router's slot


async def _admitted(call) -> list:
    """The call's first item (an empty list once the router admitted the request)."""
    async for item in call:
        return item
    raise ApiError(500, "generation ended without output")


async def _watch(call, outputs: asyncio.Queue) -> None:
    """The rest of the call: it ends quietly when the request does; its failure (an error, the
    router's death) goes to the request's queue."""
    try:
        async for _ in call:
            pass
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - raised by the consumer
        outputs.put_nowait(e)


def _take(items: list, outputs: asyncio.Queue) -> tuple[list, bool]:
    """Everything waiting, flattened: outputs up to the final one, or the failure raised."""
    while not outputs.empty():
        items.append(outputs.get_nowait())
    batch = []
    for item in items:
        if isinstance(item, BaseException):
            raise item
        for o in item:
            batch.append(o)
            if o.finish_reason:
                return batch, True
    return batch, False


async def first(stream: AsyncIterator[list]) -> list:
    """The first batch (empty: the router admitted the request), so that a request that cannot start
    fails before a response is sent."""
    try:
        return await anext(stream)
    except StopAsyncIteration:
        raise ApiError(500, "generation ended without output") from None
