"""The router: backbone + gating + continuous batching, serving HTTP (OpenAI) and gRPC.

It fans each MoE layer's rows out to the expert workers over the gRPC data
plane (deployments/data_plane.py); with no workers the experts stay in-process.
"""

import asyncio
import hmac
import json
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
import grpc
import numpy as np
from pydantic import BaseModel, ValidationError
import ray
from ray import serve

from cluster.engine import Completion, InvalidRequest, LLMEngine, SamplingParams
from cluster.engine.async_engine import AsyncEngine, EngineDeadError
from cluster.loader import open_model
from cluster.placement import round_robin
from cluster.rebalance import worker_imbalance
from deployments import grpc_api, metrics
from deployments.autoscaler import ExpertAutoscaler
from deployments.chat import load_template, render
from deployments.config import AppConfig, app_config
from deployments.data_plane import ExpertUnavailable, RemoteExperts
from deployments.openai_api import ChatCompletionRequest, CompletionRequest, chunk_json, completion_json, error_body
from deployments.policy import AutoscalePolicy, describe
from protos import moe_serving_pb2 as pb

app = FastAPI(title="moe-cluster")


class RequestFailed(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def __reduce__(self):  # Serve ships exceptions between processes
        return RequestFailed, (self.status, self.message, self.param)

    def response(self) -> JSONResponse:
        kind = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
                415: "invalid_request_error", 503: "overloaded_error"}.get(self.status, "internal_error")
        return JSONResponse(error_body(self.message, kind, self.param, self.status), status_code=self.status)


class RequestTimedOut(Exception):
    pass


def _failure_status(e: EngineDeadError) -> int:
    """503 when an expert had no live copy (retry later: it is being replaced), else 500."""
    return 503 if isinstance(e.__cause__, ExpertUnavailable) else 500


def build_engine(cfg: AppConfig, workers: list, addresses: list[str],
                 local_workers: frozenset[int] = frozenset()) -> tuple[LLMEngine, RemoteExperts | None]:
    remote = None
    if workers:
        _, _, model_cfg = open_model(cfg.model)
        cache = dict(enumerate(addresses))

        def resolve(worker: int, refresh: bool = False) -> str:
            if refresh or worker not in cache:
                # A replaced worker has a new address: ask its deployment (from the engine thread).
                cache[worker] = workers[worker].get_address.remote().result(timeout_s=60)
            return cache[worker]

        placement = round_robin(model_cfg.expert_pairs(), len(workers), cfg.expert_copies)
        remote = RemoteExperts(placement, resolve, local_workers, call_timeout_s=cfg.expert_call_timeout_s)
    engine = LLMEngine.from_pretrained(cfg.model, device=cfg.router_device, experts=remote,
                                       max_model_len=cfg.max_model_len, max_num_seqs=cfg.max_num_seqs,
                                       max_num_batched_tokens=cfg.max_num_batched_tokens)
    return engine, remote


@serve.deployment(max_ongoing_requests=1024, health_check_period_s=5)
@serve.ingress(app)
class Router:
    async def __init__(self, config: dict, workers: list | None = None, pool=None):
        self.cfg = app_config(config)
        self.workers = list(workers or [])
        addresses = [await h.get_address.remote() for h in self.workers]
        self.node = ray.get_runtime_context().get_node_id()
        self.worker_nodes = [await h.get_node_id.remote() for h in self.workers]
        local = frozenset(w for w, n in enumerate(self.worker_nodes) if n == self.node)
        engine, self.remote = build_engine(self.cfg, self.workers, addresses, local)
        self.engine = AsyncEngine(engine)
        self.draining = False
        self.template = load_template(self.cfg.model)
        policy = self.cfg.policy()
        self.autoscaler = None
        if policy is not None and self.remote is not None:
            model_cfg = engine.cfg
            expert_bytes = 3 * model_cfg.hidden_size * model_cfg.expert_intermediate_size * 4  # fp32 gate/up/down
            self.autoscaler = ExpertAutoscaler(policy, engine.load, self.remote, expert_bytes)
            self._autoscale_task = asyncio.get_running_loop().create_task(self.autoscaler.run())

    # -- guards ------------------------------------------------------------------------------
    def _key_ok(self, presented: str | None) -> bool:
        key = self.cfg.resolved_api_key()
        return key is None or (presented is not None and hmac.compare_digest(presented.encode(), key.encode()))

    def _deny(self, request: Request) -> JSONResponse | None:
        """401 unless the API key (when one is configured) came as `Authorization: Bearer KEY`."""
        auth = request.headers.get("authorization", "")
        if self._key_ok(auth[len("Bearer "):] if auth.startswith("Bearer ") else None):
            return None
        metrics.REQUESTS.labels("http", "unauthorized").inc()
        return RequestFailed(401, "missing or wrong API key (send Authorization: Bearer <key>)").response()

    def _check_capacity(self) -> None:
        if self.draining:
            raise RequestFailed(503, "server is shutting down; send new requests elsewhere")
        if self.engine.active >= self.cfg.max_num_seqs + self.cfg.max_queued_requests:
            raise RequestFailed(503, f"server overloaded: {self.engine.active} requests in progress; retry later")

    # -- HTTP: small endpoints ---------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> dict:
        """Liveness: open without an API key."""
        return {"status": "ok", "model": self.cfg.model_name, "expert_workers": len(self.workers)}

    @app.get("/ready")
    async def ready(self):
        """Readiness: 503 while draining or while some expert has no live copy (open without a key)."""
        uncovered = self.remote.uncovered() if self.remote else []
        if self.draining or uncovered:
            reason = "draining" if self.draining else f"{len(uncovered)} expert slot(s) without a live copy"
            return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)
        return {"status": "ready"}

    def _worker_imbalance(self) -> list[float]:
        """Per MoE layer: most-loaded worker / mean worker load (EMA loads, current placement)."""
        load = self.engine.engine.load
        loads = np.array(load.snapshot()["ema_tokens_per_step"])
        placement = self.remote.placement
        active = self.autoscaler.active() if self.autoscaler else None
        return worker_imbalance(loads, list(load.moe_layers), placement, placement.num_workers, active)

    # -- lifecycle (called through the deployment handle by `moe-cluster serve` on SIGTERM) --
    def drain(self) -> int:
        """Refuse new requests (503) from now on; returns the requests still in flight."""
        self.draining = True
        return self.engine.active

    def in_flight(self) -> int:
        return self.engine.active

    # -- the expert pool (ExpertPoolWorker replicas, scaled by Serve) -----------------------
    async def register_worker(self, address: str, node_id: str) -> int:
        """A pool replica joins, empty: the next rebalance hands it copies of the hottest experts."""
        if self.remote is None or self.autoscaler is None:
            raise RuntimeError("the expert pool needs expert workers and an autoscaling policy")
        async with self.autoscaler.lock:  # not in the middle of a table change
            known = self.remote.worker_at(address)
            if known is not None:
                return known
            worker = self.remote.add_worker(address, node_id == self.node)
            self.worker_nodes.append(node_id)
            self.autoscaler.last_change = 0.0  # a new worker: no cooldown before using it
        return worker

    async def unregister_worker(self, address: str) -> int:
        """A pool replica is stopping: it hands its copies back before it goes."""
        worker = self.remote.worker_at(address)
        if worker is None or self.autoscaler is None:
            return 0
        return await self.autoscaler.remove_worker(worker)

    @app.get("/v1/models")
    async def models(self, request: Request):
        if denied := self._deny(request):
            return denied
        return {"object": "list", "data": [{"id": self.cfg.model_name, "object": "model", "owned_by": "moe-cluster",
                                            "created": 0}]}

    @app.get("/metrics")
    async def prometheus(self, request: Request) -> Response:
        if denied := self._deny(request):
            return denied
        metrics.WORKERS_DOWN.set(len(self.remote.down_workers()) if self.remote else 0)
        if self.remote:
            for layer, ratio in zip(self.engine.engine.load.moe_layers, self._worker_imbalance()):
                metrics.WORKER_IMBALANCE.labels(str(layer)).set(ratio)
            for worker, slots in enumerate(self.remote.placement.workers):
                metrics.COPIES.labels(str(worker)).set(len(slots))
        body = metrics.render(self.engine.stats(), self.engine.engine.load.snapshot())
        return PlainTextResponse(body.decode(), media_type="text/plain; version=0.0.4")

    @app.get("/admin/load")
    async def load(self, request: Request):
        """The (layer x expert) load matrix (EMA tokens per step, totals) and the current placement."""
        if denied := self._deny(request):
            return denied
        placement = self.remote.placement if self.remote else None
        workers = [[list(slot) for slot in slots] for slots in placement.workers] if placement else "in-process"
        return {"load": self.engine.engine.load.snapshot(), "placement": {"workers": workers}}

    @app.get("/admin/autoscaler")
    async def autoscaler_state(self, request: Request):
        if denied := self._deny(request):
            return denied
        if self.autoscaler is None:
            return {"enabled": False, "reason": "no policy configured or no expert workers"}
        return {"policy": self.autoscaler.policy.model_dump(), "history": self.autoscaler.history[-50:]}

    @app.put("/admin/policy")
    async def set_policy(self, request: Request):
        """Change the autoscaling policy on a running cluster (validated; no restart)."""
        if denied := self._deny(request):
            return denied
        if self.autoscaler is None:
            return RequestFailed(404, "the autoscaler is not running (no policy configured or no workers)").response()
        try:
            body = json.loads(await request.body())
            policy = AutoscalePolicy(**{**self.autoscaler.policy.model_dump(), **body})
        except (ValueError, TypeError) as e:
            message = describe(e) if isinstance(e, ValidationError) else "body must be a JSON object of policy fields"
            return RequestFailed(400, message).response()
        self.autoscaler.set_policy(policy)
        return {"policy": policy.model_dump()}

    @app.get("/admin/stats")
    async def stats(self, request: Request):
        """Engine counters and where the router's step time went (for bench/serve_bench.py)."""
        if denied := self._deny(request):
            return denied
        data_plane = None
        if self.remote:
            data_plane = {**self.remote.timer.snapshot(), "failovers": self.remote.failovers,
                          "failures": self.remote.failures, "down_workers": self.remote.down_workers(),
                          "calls_per_worker": self.remote.calls_per_worker, "worker_nodes": self.worker_nodes,
                          "local_workers": sorted(self.remote.local_workers),
                          "worker_max_over_mean": [round(r, 3) for r in self._worker_imbalance()],
                          "copies": sum(len(slots) for slots in self.remote.placement.workers),
                          "copies_per_worker": [len(slots) for slots in self.remote.placement.workers],
                          "retired_workers": sorted(self.autoscaler.retired) if self.autoscaler else []}
        return {**self.engine.stats(), "data_plane": data_plane}

    # -- HTTP: completions -------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._serve_http(request, CompletionRequest, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._serve_http(request, ChatCompletionRequest, chat=True)

    async def _serve_http(self, request: Request, model_cls: type[BaseModel], chat: bool):
        if denied := self._deny(request):
            return denied
        try:
            self._check_capacity()
            req = await self._parse(request, model_cls)
            prompt = render(self.template, [m.model_dump() for m in req.messages]) if chat else req.prompt
            params = req.sampling_params() if chat else req.sampling_params(req.logprobs)
            prompt_ids = self.engine.prepare(prompt, params)
        except RequestFailed as e:
            metrics.REQUESTS.labels("http", "rejected").inc()
            return e.response()
        except InvalidRequest as e:
            metrics.REQUESTS.labels("http", "rejected").inc()
            return RequestFailed(400, str(e), e.param).response()
        rid = ("chatcmpl-" if chat else "cmpl-") + request.headers.get("x-request-id", str(time.time_ns()))
        with_logprobs = params.logprobs is not None
        decode = self.engine.engine.tokenizer.decode if self.engine.engine.tokenizer else (lambda ids: "")
        if req.stream:
            return StreamingResponse(self._sse(rid, prompt_ids, params, decode, with_logprobs, chat),
                                     media_type="text/event-stream")
        try:
            out = await self._run(rid, prompt_ids, params)
        except RequestTimedOut:
            metrics.REQUESTS.labels("http", "timeout").inc()
            return RequestFailed(408, f"request timed out after {self.cfg.request_timeout_s} s").response()
        except EngineDeadError as e:
            metrics.REQUESTS.labels("http", "failed").inc()
            return RequestFailed(_failure_status(e), f"generation failed: {e}").response()
        return JSONResponse(completion_json(rid, self.cfg.model_name, out, decode, with_logprobs, chat))

    async def _parse(self, request: Request, model_cls: type[BaseModel]) -> BaseModel:
        if "application/json" not in request.headers.get("content-type", ""):
            raise RequestFailed(415, "Content-Type must be application/json")
        limit = self.cfg.max_body_bytes
        if int(request.headers.get("content-length") or 0) > limit:
            raise RequestFailed(413, f"request body over {limit} bytes")
        raw = await request.body()
        if len(raw) > limit:
            raise RequestFailed(413, f"request body over {limit} bytes")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise RequestFailed(400, "request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise RequestFailed(400, "request body must be a JSON object")
        try:
            req = model_cls.model_validate(body)
        except ValidationError as e:
            err = e.errors()[0]
            param = ".".join(str(x) for x in err["loc"]) or None
            raise RequestFailed(400, f"{param}: {err['msg']}", param) from None
        if req.model and req.model != self.cfg.model_name:
            raise RequestFailed(404, f"model {req.model[:100]!r} not found (serving {self.cfg.model_name!r})", "model")
        return req

    async def _stream(self, prompt_ids: list[int], params: SamplingParams):
        """Engine outputs, timing TTFT and inter-token latency; stops at the request timeout
        (leaving the engine's generator aborts the sequence and frees its KV-cache slot)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.request_timeout_s
        last = start = time.perf_counter()
        outputs = self.engine.generate(prompt_ids, params)
        while True:
            try:
                o = await asyncio.wait_for(anext(outputs), max(deadline - loop.time(), 0))
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                raise RequestTimedOut() from None
            now = time.perf_counter()
            (metrics.ITL if last != start else metrics.TTFT).observe(now - last)
            last = now
            metrics.GENERATED_TOKENS.inc()
            if o.finish_reason:
                metrics.EXPERT_TOKENS.inc(o.expert_tokens)
            yield o

    async def _run(self, rid: str, prompt_ids: list[int], params: SamplingParams) -> Completion:
        outs = [o async for o in self._stream(prompt_ids, params)]
        metrics.REQUESTS.labels("http", "ok").inc()
        last = outs[-1]
        return Completion(rid, prompt_ids, [o.token_id for o in outs], "".join(o.text_delta for o in outs),
                          last.finish_reason, [o.sampled for o in outs] if params.logprobs is not None else [],
                          last.expert_tokens, [o.routing for o in outs if o.routing is not None])

    async def _sse(self, rid, prompt_ids, params, decode, with_logprobs: bool, chat: bool):
        try:
            async for o in self._stream(prompt_ids, params):
                yield f"data: {json.dumps(chunk_json(rid, self.cfg.model_name, o, decode, with_logprobs, chat))}\n\n"
            metrics.REQUESTS.labels("http", "ok").inc()
        except RequestTimedOut:
            metrics.REQUESTS.labels("http", "timeout").inc()
            message = f"request timed out after {self.cfg.request_timeout_s} s"
            yield f"data: {json.dumps(error_body(message, 'timeout_error', None, 408))}\n\n"
        except EngineDeadError as e:
            metrics.REQUESTS.labels("http", "failed").inc()
            status = _failure_status(e)
            kind = "service_unavailable_error" if status == 503 else "internal_error"
            yield f"data: {json.dumps(error_body(f'generation failed: {e}', kind, None, status))}\n\n"
        yield "data: [DONE]\n\n"

    # -- gRPC (protos/moe_serving.proto, through Serve's gRPC proxy) ------------------------
    def _grpc_prepare(self, request: pb.CompleteRequest, grpc_context):
        try:
            if not self._key_ok(grpc_api.api_key_of(grpc_context.invocation_metadata())):
                raise RequestFailed(401, "missing or wrong API key (metadata authorization: Bearer <key>)")
            self._check_capacity()
            if request.model and request.model != self.cfg.model_name:
                raise RequestFailed(404, f"model {request.model[:100]!r} not found")
            params = grpc_api.sampling_params(request)
            return self.engine.prepare(grpc_api.prompt_of(request), params), params
        except (RequestFailed, InvalidRequest) as e:
            status = e.status if isinstance(e, RequestFailed) else 400
            draining = status == 503 and self.draining
            grpc_context.set_code(grpc.StatusCode.UNAVAILABLE if draining else grpc_api.STATUS[status])
            grpc_context.set_details(str(e)[:500])
            metrics.REQUESTS.labels("grpc", "rejected").inc()
            raise  # Serve turns an exception raised after set_code into that status (streams too)

    @staticmethod
    def _grpc_failed(grpc_context, e: EngineDeadError):
        unavailable = _failure_status(e) == 503
        grpc_context.set_code(grpc.StatusCode.UNAVAILABLE if unavailable else grpc.StatusCode.INTERNAL)
        grpc_context.set_details(f"generation failed: {e}"[:500])
        metrics.REQUESTS.labels("grpc", "failed").inc()
        raise e

    def _grpc_timeout(self, grpc_context):
        grpc_context.set_code(grpc_api.STATUS[408])
        grpc_context.set_details(f"request timed out after {self.cfg.request_timeout_s} s")
        metrics.REQUESTS.labels("grpc", "timeout").inc()
        raise RequestTimedOut()

    async def Complete(self, request: pb.CompleteRequest, grpc_context) -> pb.CompleteReply:
        prompt_ids, params = self._grpc_prepare(request, grpc_context)
        try:
            out = await self._run(f"cmpl-{time.time_ns()}", prompt_ids, params)
        except RequestTimedOut:
            self._grpc_timeout(grpc_context)
        except EngineDeadError as e:
            self._grpc_failed(grpc_context, e)
        return pb.CompleteReply(id=out.request_id, text=out.text, token_ids=out.token_ids,
                                finish_reason=out.finish_reason,
                                usage=grpc_api.usage(len(prompt_ids), len(out.token_ids), out.expert_tokens),
                                logprobs=[grpc_api.token_logprob(s) for s in out.logprobs],
                                routing=[grpc_api.token_routing(r) for r in out.routing])

    async def Generate(self, request: pb.CompleteRequest, grpc_context):
        prompt_ids, params = self._grpc_prepare(request, grpc_context)
        rid = f"cmpl-{time.time_ns()}"
        try:
            async for o in self._stream(prompt_ids, params):
                yield self._generate_reply(rid, o, params)
        except RequestTimedOut:
            self._grpc_timeout(grpc_context)
        except EngineDeadError as e:
            self._grpc_failed(grpc_context, e)
        metrics.REQUESTS.labels("grpc", "ok").inc()

    @staticmethod
    def _generate_reply(rid: str, o, params: SamplingParams) -> pb.GenerateReply:
        reply = pb.GenerateReply(id=rid, text_delta=o.text_delta, token_id=o.token_id,
                                 finish_reason=o.finish_reason or "")
        if params.logprobs is not None:
            reply.logprob.CopyFrom(grpc_api.token_logprob(o.sampled))
        if o.routing is not None:
            reply.routing.CopyFrom(grpc_api.token_routing(o.routing))
        if o.finish_reason:
            reply.usage.CopyFrom(grpc_api.usage(o.prompt_tokens, o.completion_tokens, o.expert_tokens))
        return reply
