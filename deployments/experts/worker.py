"""Expert workers: Ray Serve replicas holding copies of experts, served over the data plane.

Each replica wraps one `ExpertHost` (deployments/experts/host.py), built from the `WorkerSpec`
it is bound with; this module adds only what Serve needs: the node it runs on, health checks,
and the pool's registration and autoscaling stats.
`ExpertWorker`: one deployment per initial-table entry, started with its experts.
`ExpertPoolWorker`: the autoscaled pool; replicas start empty, register with the
placement controller, get copies of hot experts, and hand them back before they stop.
"""
from __future__ import annotations

import asyncio
import logging
import time

import ray

from deployments.experts.host import ExpertHost, WorkerSpec

log = logging.getLogger("ray.serve")


class ExpertWorker:
    """Serve deployment (options applied in deployments/app.py)."""

    def __init__(self, spec: WorkerSpec):
        # routers prefer copies on their own Ray node
        self.host = ExpertHost(spec, node_id=ray.get_runtime_context().get_node_id())

    def get_endpoints(self) -> dict[str, str]:
        return self.host.endpoints()

    def check_health(self) -> None:
        """Serve's liveness probe: a replica that lost its data-plane server is replaced."""
        self.host.check_health()

    def __del__(self):
        if getattr(self, "host", None) is not None:
            self.host.stop()


class ExpertPoolWorker(ExpertWorker):
    """Scaled by Serve between the pool's min and max on its own load: `record_autoscaling_stats`
    reports the fraction of time spent computing experts (and the target);
    `deployments.pool_policy.scale_on_busy` decides."""

    def __init__(self, spec: WorkerSpec, *, controller, build_id: str, target_busy: float = 0.6):
        super().__init__(spec)
        self.controller, self.build_id, self.target_busy = controller, build_id, target_busy
        self.registered = False
        self._last = (time.monotonic(), 0.0)

    async def _register(self) -> None:
        """Join the table; repeated on every stats call (idempotent), so a restarted controller
        learns of this worker again."""
        try:
            await asyncio.wait_for(self.controller.register_worker.remote(self.get_endpoints(), self.build_id), 10)
            self.registered = True
        except Exception as e:  # noqa: BLE001 - the controller may be starting
            log.info("expert pool: controller not reachable yet (%s)", type(e).__name__)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        await self._register()
        now, busy = time.monotonic(), self.host.compute.busy_s
        (then, before), self._last = self._last, (now, busy)
        return {"busy": min(1.0, (busy - before) / max(now - then, 1e-6)), "target_busy": self.target_busy}

    async def __del__(self):
        """Serve stops this replica: hand its copies back first (the controller moves any copy
        that would be the last one, switches every router's table, then lets it go)."""
        if getattr(self, "registered", False):
            try:
                await asyncio.wait_for(self.controller.unregister_worker.remote(self.host.address, self.build_id),
                                       timeout=240)
            except Exception:  # noqa: BLE001 - the controller may be gone too (shutdown)
                log.exception("expert pool: hand-back failed")
        if getattr(self, "host", None) is not None:
            self.host.stop()
