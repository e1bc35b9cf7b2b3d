"""The ingress: the public HTTP and gRPC APIs (deployments/api/), in front of the routers.

Light replicas, CPU only: they parse, validate and tokenise requests, send each
choice to a router and stream the outputs back, resuming a request on another
router if its router dies (deployments/api/router_client.py). Every half second
each replica tells the placement controller how many requests it has in flight
and learns the cluster's state (readiness, draining, the shutdown cut-off).
"""
from __future__ import annotations

import asyncio
import logging
import time

from deployments.api.grpc import GrpcServing
from deployments.api.http import build_http_app
from deployments.api.serving import Serving
from deployments.messages import AppSpec
from deployments.replica import replica_id
from deployments.tokens.sink import TokenSink

log = logging.getLogger("ray.serve")
POLL_INTERVAL_S = 0.5
METRICS_CACHE_S = 1.0


class Ingress(GrpcServing):
    """Serve deployment; `deployments/app.py` wraps it with `serve.ingress()`."""

    async def __init__(self, spec: AppSpec, routers, controller, pool=None):
        # `pool` (the expert-pool deployment) is bound here only so the application deploys it.
        self.spec, self.cfg, self.controller = spec, spec.cfg, controller
        self.sink = TokenSink(self.cfg.data_plane_host, spec.data_plane_secret)
        await self.sink.start()  # routers send this replica's outputs here, one message per step
        self.serving = Serving(self.cfg, routers, self.sink)
        self.id = replica_id()
        self.cluster_state: dict = {"ready": False, "reason": "starting"}
        self._metrics: tuple[float, str] = (0.0, "")
        self._poller = asyncio.get_running_loop().create_task(self._poll_forever())

    def __serve_build_asgi_app__(self):
        return build_http_app(self)

    async def cluster_metrics(self) -> str:
        """The controller's metrics (routers, expert load, placement, rebalancing), cached briefly."""
        at, text = self._metrics
        if time.monotonic() - at > METRICS_CACHE_S:
            try:
                text = await asyncio.wait_for(self.controller.metrics_text.remote(), 5)
            except Exception as e:  # noqa: BLE001 - the controller may be restarting: show what we have
                log.info("controller metrics unavailable: %s", type(e).__name__)
            self._metrics = (time.monotonic(), text)
        return text

    async def _poll_forever(self) -> None:
        while True:
            try:
                state = await asyncio.wait_for(self.controller.ingress_report.remote(self.id, self.serving.active), 5)
                self.cluster_state = state
                self.serving.apply_cluster_state(state)
            except Exception as e:  # noqa: BLE001 - keep the last state; traffic does not depend on it
                log.info("ingress %s: controller unreachable (%s)", self.id, type(e).__name__)
            await asyncio.sleep(POLL_INTERVAL_S)
