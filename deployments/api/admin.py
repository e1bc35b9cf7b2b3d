"""/admin/*: the cluster as the placement controller sees it, and its runtime policy.

Small route bodies: the controller owns the figures; a controller that is down or
restarting gives 503 (traffic is unaffected: routers keep their last table).
"""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from deployments.api.body import parse_json, read_bytes
from deployments.api.errors import ApiError, cause_of

ADMIN_CALL_TIMEOUT_S = 10.0  # an admin call may wait for the controller's lock (a change in progress)


def admin_routes(ingress) -> APIRouter:
    router = APIRouter(prefix="/admin")

    async def ask(call):
        try:
            return await asyncio.wait_for(call, ADMIN_CALL_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001
            cause = cause_of(e)
            if isinstance(cause, ValueError):
                raise ApiError(400, str(cause)) from None
            raise ApiError(503, "the placement controller is not answering (restarting?); retry") from None

    @router.get("/load")
    async def load():
        """The (layer x expert) expert-load matrix (EMA tokens per step, totals) and the placement table."""
        return await ask(ingress.controller.admin.remote("load"))

    @router.get("/autoscaler")
    async def autoscaler():
        return await ask(ingress.controller.admin.remote("autoscaler"))

    @router.get("/stats")
    async def stats():
        """Every router's engine counters and where its step time went (bench/serve_bench.py)."""
        return {**await ask(ingress.controller.admin.remote("stats")),
                "ingress": {"active_requests": ingress.serving.active}}

    @router.put("/policy")
    async def set_policy(request: Request):
        """Change the autoscaling policy on a running cluster (validated; no restart)."""
        body = parse_json(await read_bytes(request, ingress.cfg.max_body_bytes))
        return {"policy": await ask(ingress.controller.set_policy.remote(body))}

    return router
