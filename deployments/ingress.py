"""The ingress: the public HTTP and gRPC APIs (deployments/api/), in front of the routers.

Light replicas, CPU only: they parse, validate and tokenise requests, send each
choice to a router and stream the outputs back, resuming a request on another
router if its router dies (deployments/api/router_client.py). Every half second
each replica tells the placement controller how many requests it has in flight
and its metric figures, and learns the cluster's state (readiness, draining, the
shutdown cut-off). `/metrics` is the controller's answer: every replica's figures
summed (deployments/metrics.py), the same whichever replica is asked.
"""
from __future__ import annotations

import asyncio
import logging

from deployments import metrics
from deployments.api.grpc import GrpcServing, quiet_answered_calls
from deployments.api.http import build_http_app
from deployments.api.serving import Serving
from deployments.messages import AppSpec
from deployments.replica import replica_id
from deployments.tokens.sink import TokenSink

log = logging.getLogger("ray.serve")
POLL_INTERVAL_S = 0.5
CONTROLLER_TIMEOUT_S = 5.0


class Ingress(GrpcServing):
    """Serve deployment; `deployments/app.py` wraps it with `serve.ingress()`."""

    async def __init__(self, spec: AppSpec, routers, controller, pool=None):
        # `pool` (the expert-pool deployment) is bound here only so the application deploys it.
        self.spec, self.cfg, self.controller = spec, spec.cfg, controller
        quiet_answered_calls(log)  # Serve's logger: no traceback for a gRPC call answered with a client's status
        self.sink = TokenSink(self.cfg.data_plane_host, spec.data_plane_secret)
        await self.sink.start()  # routers send this replica's outputs here, one message per step
        self.serving = Serving(self.cfg, routers, self.sink)
        self.id = replica_id()
        self.cluster_state: dict = {"ready": False, "reason": "starting"}
        self._metrics = ""  # the last /metrics the controller gave, shown while it is unreachable
        self._poller = asyncio.get_running_loop().create_task(self._poll_forever())

    def __serve_build_asgi_app__(self):
        return build_http_app(self)

    async def service_metrics(self) -> str:
        """The service's /metrics from the controller (ingress figures summed over replicas, this one's sent
        along so they are current; routers, expert load, placement, rebalancing)."""
        try:
            call = self.controller.metrics_text.remote(self.id, metrics.ingress_figures())
            self._metrics = await asyncio.wait_for(call, CONTROLLER_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - the controller may be restarting: show what we have
            log.info("controller metrics unavailable: %s", type(e).__name__)
        return self._metrics

    async def _poll_forever(self) -> None:
        while True:
            try:
                call = self.controller.ingress_report.remote(self.id, self.serving.active, metrics.ingress_figures())
                state = await asyncio.wait_for(call, CONTROLLER_TIMEOUT_S)
                self.cluster_state = state
                self.serving.apply_cluster_state(state)
            except Exception as e:  # noqa: BLE001 - keep the last state; traffic does not depend on it
                log.info("ingress %s: controller unreachable (%s)", self.id, type(e).__name__)
            await asyncio.sleep(POLL_INTERVAL_S)
