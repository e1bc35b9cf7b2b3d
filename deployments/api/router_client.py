"""The ingress's way to a router: one streamed `generate` call per choice, over a Serve handle
(power-of-two-choices over the router replicas' queues).

If the router serving a request dies, the request moves to another router and
resumes where the client is: the new router replays it (every request carries a
seed, so greedy and sampled requests replay exactly) and skips what was already
delivered. No request is lost to one router's death.
"""
from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

from ray.exceptions import RayActorError

from cluster.engine import SamplingParams
from deployments import metrics
from deployments.api.errors import ApiError
from deployments.messages import GenerateRequest

log = logging.getLogger("ray.serve")
MAX_RESUMES = 3
RESUME_BACKOFF_S = 0.5


def _router_died(exc: BaseException) -> bool:
    if isinstance(exc, RayActorError):
        return True
    cause = getattr(exc, "cause", None)
    return isinstance(cause, RayActorError) or type(exc).__name__ in ("ActorDiedError", "ActorUnavailableError")


class RouterClient:
    def __init__(self, routers):
        self.routers = routers.options(stream=True)

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[list]:
        """Batches of StepOutput until the request finishes; ApiError on failure."""
        delivered, resumes = 0, 0
        while True:
            stream = self.routers.generate.remote(GenerateRequest(prompt_ids, params, skip=delivered))
            done = False
            try:
                async for batch in stream:
                    delivered += len(batch)
                    yield batch
                done = True
                return
            except Exception as e:  # noqa: BLE001 - router death is retried; the rest is the client's error
                if not _router_died(e) or resumes >= MAX_RESUMES:
                    raise
                resumes += 1
                metrics.RESUMED.inc()
                log.warning("router died mid-request; resuming on another (%d tokens delivered)", delivered)
                await asyncio.sleep(RESUME_BACKOFF_S * resumes)
            finally:
                if not done:
                    stream.cancel()  # the client left, timed out or failed: free the router's slot


async def first(stream: AsyncIterator[list]) -> list:
    """The first batch (empty: the router admitted the request), so that a request that cannot start
    fails before a response is sent."""
    try:
        return await anext(stream)
    except StopAsyncIteration:
        raise ApiError(500, "generation ended without output") from None
