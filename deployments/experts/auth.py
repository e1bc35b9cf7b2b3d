"""The expert data plane's shared secret: every call carries it, every worker checks it.

One secret per application: from `data_plane_secret` in the config, else the
MOE_CLUSTER_DATA_PLANE_SECRET environment variable (a Kubernetes Secret), else
one `build_app` generates. A caller without it can neither read activations
(Forward) nor change what a worker holds (LoadCopies, Retire): UNAUTHENTICATED. The
same-node transports check the same secret when a connection opens
(transport/local_socket.py).
"""
from __future__ import annotations

import hmac
import os
import secrets

import grpc

METADATA_KEY = "moe-data-plane-secret"
ENV = "MOE_CLUSTER_DATA_PLANE_SECRET"


def resolve_secret(configured: str | None) -> str:
    return configured or os.environ.get(ENV) or secrets.token_urlsafe(32)


def call_metadata(secret: str) -> tuple[tuple[str, str], ...]:
    return ((METADATA_KEY, secret),)


def _deny(request_or_stream, context):
    context.abort(grpc.StatusCode.UNAUTHENTICATED, "expert data plane: missing or wrong secret")


# A refusal shaped like the method refused (unary or streaming): gRPC reads the request the
# way the handler it gets says, so a unary refusal of a stream would misread the call.
_DENY = {(False, False): grpc.unary_unary_rpc_method_handler(_deny),
         (True, True): grpc.stream_stream_rpc_method_handler(_deny),
         (False, True): grpc.unary_stream_rpc_method_handler(_deny),
         (True, False): grpc.stream_unary_rpc_method_handler(_deny)}


class SecretInterceptor(grpc.ServerInterceptor):
    """Refuses every call whose metadata lacks the secret (compared in constant time)."""

    def __init__(self, secret: str):
        if not secret:
            raise ValueError("the expert data plane needs a secret")
        self._secret = secret.encode()

    def intercept_service(self, continuation, handler_call_details):
        sent = dict(handler_call_details.invocation_metadata or ()).get(METADATA_KEY, "")
        handler = continuation(handler_call_details)
        if hmac.compare_digest(sent.encode(), self._secret):
            return handler
        shape = (handler.request_streaming, handler.response_streaming) if handler is not None else (False, False)
        return _DENY[shape]
