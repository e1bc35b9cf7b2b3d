"""The ingress end of the token stream: a gRPC server that hands each request its outputs.

Each message holds one router step's outputs for every request of this ingress
replica on that router; the sink splits it by request id and calls each request's
callback (its queue's put) in the ingress's event loop. Outputs of a request that is
no longer registered (it ended, or was resumed elsewhere under a new id) are dropped.
"""
from __future__ import annotations

import hmac
import logging
from typing import Callable

import grpc
from grpc import aio

from deployments.tokens import wire

log = logging.getLogger("ray.serve")
ANY_HOST = ("0.0.0.0", "::", "[::]", "")


def advertised(host: str) -> str:
    """The address routers dial: the bind host, or this node's IP when bound to every interface."""
    if host not in ANY_HOST:
        return host
    import ray

    return ray.util.get_node_ip_address()


class TokenSink:
    def __init__(self, host: str, secret: str):
        if not secret:
            raise ValueError("the token stream needs a secret")
        self.host, self._secret = host, secret.encode()
        self._requests: dict[str, Callable[[list], None]] = {}
        self._server: aio.Server | None = None
        self.address = ""

    async def start(self) -> str:
        server = aio.server(options=wire.OPTIONS)
        handler = grpc.stream_unary_rpc_method_handler(self._deliver)  # bytes in, bytes out
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(wire.SERVICE, {wire.NAME: handler})])
        port = server.add_insecure_port(f"{self.host}:0")
        await server.start()
        self._server, self.address = server, f"{advertised(self.host)}:{port}"
        return self.address

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=None)

    def register(self, request_id: str, deliver: Callable[[list], None]) -> None:
        self._requests[request_id] = deliver

    def unregister(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def dispatch(self, message: bytes) -> None:
        for request_id, outputs in wire.decode(message):
            deliver = self._requests.get(request_id)
            if deliver is not None:
                deliver(outputs)

    async def _deliver(self, messages, context: aio.ServicerContext) -> bytes:
        sent = dict(context.invocation_metadata() or ()).get(wire.SECRET_KEY, "")
        if not hmac.compare_digest(sent.encode(), self._secret):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "token stream: missing or wrong secret")
        async for message in messages:
            self.dispatch(message)
        return b""
