"""Failures as clients see them: one table from status to OpenAI error type, gRPC code and
Retry-After, used by HTTP (bodies and stream error events alike) and gRPC.

Everything that can go wrong while serving a request ends as an `ApiError`, made here
in the ingress alone: `classify` maps the routers' errors (RouterError and the engine's
own, deployments/router.py), Ray's and the chat template's exceptions onto it, and
anything unexpected becomes a 500 that carries no traceback, path or exception text.
"""
from __future__ import annotations

from dataclasses import dataclass

import grpc


@dataclass(frozen=True)
class Status:
    openai_type: str
    grpc_code: grpc.StatusCode
    retry_after_s: int | None = None


HTTP_STATUSES: dict[int, Status] = {
    400: Status("invalid_request_error", grpc.StatusCode.INVALID_ARGUMENT),
    401: Status("authentication_error", grpc.StatusCode.UNAUTHENTICATED),
    404: Status("not_found_error", grpc.StatusCode.NOT_FOUND),
    405: Status("invalid_request_error", grpc.StatusCode.UNIMPLEMENTED),
    408: Status("timeout_error", grpc.StatusCode.DEADLINE_EXCEEDED),
    413: Status("invalid_request_error", grpc.StatusCode.RESOURCE_EXHAUSTED),
    415: Status("invalid_request_error", grpc.StatusCode.INVALID_ARGUMENT),
    500: Status("server_error", grpc.StatusCode.INTERNAL),
    503: Status("service_unavailable_error", grpc.StatusCode.UNAVAILABLE, retry_after_s=1),
}
MAX_MESSAGE_CHARS = 500  # a 100 KB bad value is never echoed back whole


class ApiError(Exception):
    """A request failed with `status`; `message` is safe to show; `param` names the field.
    `grpc_code` overrides the table (e.g. 503 for a full queue is RESOURCE_EXHAUSTED)."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 grpc_code: grpc.StatusCode | None = None, openai_type: str | None = None):
        message = message if len(message) <= MAX_MESSAGE_CHARS + 12 else message[:MAX_MESSAGE_CHARS] + "...(truncated)"
        super().__init__(message)
        self.status, self.message, self.param = status if status in HTTP_STATUSES else 500, message, param
        self._grpc_code, self._openai_type = grpc_code, openai_type

    def __reduce__(self):  # Serve ships exceptions between processes
        return ApiError, (self.status, self.message, self.param, self._grpc_code, self._openai_type)

    @property
    def kind(self) -> Status:
        return HTTP_STATUSES[self.status]

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return self._grpc_code or self.kind.grpc_code

    def body(self) -> dict:
        """The OpenAI error body (also the payload of a stream's error event)."""
        kind = self._openai_type or self.kind.openai_type
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status}}

    def headers(self) -> dict[str, str]:
        retry = self.kind.retry_after_s
        return {"Retry-After": str(retry)} if retry is not None else {}


CANCELLED = "cancelled"  # the `outcome` of a request whose client went away before it ended


def outcome(error: ApiError) -> str:
    """The `outcome` label of moe_requests_total, the same for HTTP and gRPC."""
    return {401: "unauthorized", 408: "timeout", 503: "unavailable"}.get(
        error.status, "rejected" if error.status < 500 else "failed")


def overloaded(message: str) -> ApiError:
    """The server is full: 503 on HTTP, RESOURCE_EXHAUSTED on gRPC (retry later)."""
    return ApiError(503, message, grpc_code=grpc.StatusCode.RESOURCE_EXHAUSTED, openai_type="overloaded_error")


def cause_of(exc: BaseException) -> BaseException:
    """Ray wraps an exception raised in another replica; its `cause` is the original."""
    seen = 0
    while getattr(exc, "cause", None) is not None and seen < 4:
        exc, seen = exc.cause, seen + 1
    return exc


def classify(exc: BaseException) -> ApiError:
    """Any exception → the ApiError a client gets for it."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError

    from cluster.engine import InvalidRequest
    from cluster.engine.async_engine import EngineDeadError, SequenceFailed
    from deployments.api.chat_jinja import ChatTemplateError
    from deployments.experts.remote import ExpertUnavailable
    from deployments.messages import RouterError

    exc = cause_of(exc)
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RouterError):
        return from_router(exc)
    if isinstance(exc, InvalidRequest):
        return ApiError(400, str(exc), exc.param)
    if isinstance(exc, ExpertUnavailable):
        return ApiError(503, f"generation failed: {exc}")
    if isinstance(exc, (RayActorError, EngineDeadError)):
        return ApiError(503, "the router serving this request stopped; retry the request")
    if isinstance(exc, SequenceFailed):
        return ApiError(500, f"generation failed for this request: {exc}")
    if isinstance(exc, ChatTemplateError):
        return ApiError(400, f"chat template: {exc}", "messages")
    if isinstance(exc, BackPressureError):
        return overloaded("server overloaded: every router's queue is full; retry later")
    return ApiError(500, "internal error")


def answered_types() -> tuple[type[BaseException], ...]:
    """The exceptions `classify` has an answer of its own for (the types it names above but ApiError,
    which has its handler). Handled as such, the server answers without logging a traceback for a
    client's fault: Starlette's catch-all `Exception` handler answers too, but then re-raises for the
    server to log as a failure. Ray's wrapper of a remote exception subclasses the original, so it is
    found by the original's type."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError

    from cluster.engine import InvalidRequest
    from cluster.engine.async_engine import EngineDeadError, SequenceFailed
    from deployments.api.chat_jinja import ChatTemplateError
    from deployments.experts.remote import ExpertUnavailable
    from deployments.messages import RouterError

    return (InvalidRequest, RouterError, ExpertUnavailable, RayActorError, EngineDeadError, SequenceFailed,
            ChatTemplateError, BackPressureError)


def from_router(error) -> ApiError:
    """A router's RouterError (deployments/messages.py) as the client's error."""
    if error.kind == "full":
        return overloaded(str(error))
    if error.kind == "internal":
        return ApiError(500, "internal error")
    return ApiError(503, str(error))  # "stopped", "uncovered": retry (elsewhere, or once healed)
