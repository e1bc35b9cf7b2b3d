"""The OpenAI-compatible HTTP API, built per ingress replica (`build_http_app`).

Auth is one dependency on every route but `/health` (liveness); errors are one
family of handlers that always answer with the OpenAI error body. With an API
key set, the docs and the OpenAPI schema are off.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from dataclasses import replace

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from deployments import metrics
from deployments.api.admin import admin_routes
from deployments.api.api_key import bearer_key, key_matches
from deployments.api.body import read_model
from deployments.api.errors import CANCELLED, ApiError, answered_types, classify, outcome
from deployments.api.chat_reply import ChatReply
from deployments.api.responses import ChoiceResult, ChunkWriter, completion_body
from deployments.api.schema import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

log = logging.getLogger("ray.serve")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers())


def request_id(request: Request, prefix: str) -> str:
    """The client's x-request-id when it is short and plain, else a fresh one."""
    given = request.headers.get("x-request-id", "")
    return prefix + (given if _REQUEST_ID.match(given) else uuid.uuid4().hex)


# The routes whose requests moe_requests_total counts (gRPC's Complete and Generate are its others).
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")


def _refused(request: Request, error: ApiError) -> JSONResponse:
    """Every refusal of a generation request is counted here, wherever it was raised (reading the body,
    checking it, admission, the first step), so each request is counted once, by its outcome."""
    if request.url.path.rstrip("/") in GENERATION_PATHS:
        metrics.REQUESTS.labels("http", outcome(error)).inc()
    return error_response(error)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return _refused(request, e)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        message = {404: f"no route {request.url.path[:100]}", 405: f"method {request.method} not allowed here"}
        return _refused(request, ApiError(e.status_code, message.get(e.status_code, str(e.detail)[:200])))

    @app.exception_handler(RequestValidationError)
    async def validation(request, e: RequestValidationError):
        return _refused(request, ApiError(400, "invalid request"))

    async def answered(request, e: Exception):
        error = classify(e)
        if error.status >= 500:  # the client gets a short message; the log keeps what it was
            log.warning("%s %s → %d: %s: %s", request.method, request.url.path, error.status,
                        type(e).__name__, str(e)[:300], exc_info=e if error.status == 500 else None)
        return _refused(request, error)

    for expected in answered_types():
        app.add_exception_handler(expected, answered)

    @app.exception_handler(Exception)
    async def anything(request, e: Exception):  # unforeseen: answered, then re-raised and logged with its trace
        return _refused(request, classify(e))


def _key_dependency(key: str | None):
    async def require_key(request: Request) -> None:
        if key is None:
            return
        if not key_matches(bearer_key(request.headers.get("authorization", "")), key):
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer <key>)")
    return require_key


def build_http_app(ingress) -> FastAPI:
    cfg = ingress.cfg
    key = cfg.resolved_api_key()
    docs = {} if key is None else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="moe-cluster", **docs)
    _install_error_handlers(app)

    @app.get("/health")
    async def health() -> dict:
        """Liveness: open without an API key."""
        return {"status": "ok", "model": cfg.model_name}

    api = APIRouter()
    _status_routes(api, ingress)
    _generation_routes(api, ingress)
    _token_routes(api, ingress)
    api.include_router(admin_routes(ingress))
    app.include_router(api, dependencies=[Depends(_key_dependency(key))])
    return app


def _status_routes(api: APIRouter, ingress) -> None:
    cfg, serving = ingress.cfg, ingress.serving

    @api.get("/ready")
    async def ready():
        """Readiness: 503 while draining, with no router up, or while some expert has no live copy."""
        state = ingress.cluster_state
        if not state.get("ready"):
            return JSONResponse({"status": "unavailable", "reason": state.get("reason", "starting")}, 503)
        return {"status": "ready"}

    def card() -> dict:
        return {"id": cfg.model_name, "object": "model", "owned_by": "moe-cluster", "created": 0,
                "max_model_len": serving.max_model_len}

    @api.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card()]}

    @api.get("/v1/models/{model:path}")
    async def model(model: str):  # the openai SDK's client.models.retrieve(name); names may hold a "/"
        if not model.strip("/"):
            return await models()
        serving.check_model(model.rstrip("/"))
        return card()

    @api.get("/metrics")
    async def prometheus():
        """The service's figures (every ingress replica's summed by the controller), not this replica's."""
        return PlainTextResponse(await ingress.service_metrics(), media_type="text/plain; version=0.0.4")


async def _read(request: Request, model, cfg, serving):
    """Every route's head: the body as `model` (400 on anything else), for the model this server serves."""
    req = await read_model(request, model, cfg.max_body_bytes)
    serving.check_model(req.model)
    return req


def _generation_routes(api: APIRouter, ingress) -> None:
    cfg, serving = ingress.cfg, ingress.serving

    @api.post("/v1/completions")
    async def completions(request: Request):
        req = await _read(request, CompletionRequest, cfg, serving)
        choices = await serving.admitted(lambda: serving.completion_choices(req))
        return await _generate(serving, request_id(request, "cmpl-"), choices, req, chat=False, echo=req.echo,
                               with_logprobs=req.logprobs is not None)

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await _read(request, ChatCompletionRequest, cfg, serving)
        reply = serving.chat_reply(req)
        choices = await serving.admitted(lambda: serving.chat_choices(req))
        reply = replace(reply, opened=serving.opens_thinking(choices[0].prompt_ids))
        return await _generate(serving, request_id(request, "chatcmpl-"), choices, req, chat=True, echo=False,
                               with_logprobs=req.logprobs, reply=reply)


def _token_routes(api: APIRouter, ingress) -> None:
    cfg, serving = ingress.cfg, ingress.serving

    @api.post("/tokenize")
    async def tokenize(request: Request):
        req = await _read(request, TokenizeRequest, cfg, serving)
        tokens = await serving.off_loop(serving.tokenize, req)
        return {"count": len(tokens), "max_model_len": serving.max_model_len, "tokens": tokens}

    @api.post("/detokenize")
    async def detokenize(request: Request):
        req = await _read(request, DetokenizeRequest, cfg, serving)
        return {"prompt": await serving.off_loop(serving.detokenize, req.tokens)}


async def _generate(serving, rid: str, choices, req, *, chat: bool, echo: bool, with_logprobs: bool,
                    reply: ChatReply = ChatReply()):
    events = serving.stream(choices)
    try:
        head = await anext(events)  # fails here (a proper HTTP error, counted by _refused) if it cannot start
    except asyncio.CancelledError:  # the client went away before the routers admitted the request
        metrics.REQUESTS.labels("http", CANCELLED).inc()
        await events.aclose()
        raise
    except Exception as e:
        await events.aclose()
        raise classify(e) from None
    results = {c.index: ChoiceResult(c.index, c.prompt_ids, c.echo_text) for c in choices}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        writer = ChunkWriter(rid, serving.cfg.model_name, serving.text, chat=chat, echo=echo,
                             with_logprobs=with_logprobs, include_usage=include_usage, reply=reply)
        return StreamingResponse(_sse(head, events, results, writer, req.n), media_type="text/event-stream")
    try:
        _add(results, *head)
        async for index, batch in events:
            _add(results, index, batch)
    except asyncio.CancelledError:  # the client went away
        metrics.REQUESTS.labels("http", CANCELLED).inc()
        raise
    except Exception as e:
        raise classify(e) from None  # counted by _refused
    metrics.REQUESTS.labels("http", "ok").inc()
    ordered = [results[c.index] for c in choices]
    _count_expert_tokens(ordered)
    return JSONResponse(completion_body(rid, serving.cfg.model_name, ordered, req.n, serving.text, chat=chat,
                                        echo=echo, with_logprobs=with_logprobs, reply=reply))


def _add(results: dict[int, ChoiceResult], index: int, batch: list) -> None:
    for o in batch:
        results[index].add(o)


def _count_expert_tokens(results: list[ChoiceResult]) -> None:
    metrics.EXPERT_TOKENS.inc(sum(r.expert_tokens for r in results))


def _event(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _sse(head, events, results: dict[int, ChoiceResult], writer: ChunkWriter, n: int):
    """One write per step however many choices moved: the events of a batch are joined."""
    try:
        pending = [head]
        while True:
            out = []
            for index, batch in pending:
                for o in batch:
                    results[index].add(o)
                    if index not in writer.started and (opening := writer.opening(results[index])):
                        out.append(_event(opening))
                    out.extend(_event(body) for body in writer.chunks(index, o))
            if out:
                yield "".join(out)
            pending = [await anext(events)]
    except StopAsyncIteration:
        closing = writer.closing(list(results.values()), n)
        metrics.REQUESTS.labels("http", "ok").inc()
        _count_expert_tokens(list(results.values()))
        yield (_event(closing) if closing else "") + "data: [DONE]\n\n"
    except Exception as e:  # noqa: BLE001 - after the stream started: an error event, then [DONE]
        error = classify(e)
        metrics.REQUESTS.labels("http", outcome(error)).inc()
        yield _event(error.body()) + "data: [DONE]\n\n"
    except (asyncio.CancelledError, GeneratorExit):  # the client went away mid-stream
        metrics.REQUESTS.labels("http", CANCELLED).inc()
        raise
    finally:
        await events.aclose()
