"""Requests → choices → routers, shared by the HTTP and gRPC APIs.

Expensive work on a request (tokenising, chat templates) runs on a small thread
pool, never on the event loop: one huge prompt does not stall other streams.
Every choice (n per prompt, prompts batched) becomes one sequence on some
router; their outputs are merged into one stream of (choice index, outputs).
The request timeout, client disconnects and the shutdown cut-off all end a
request the same way: its router calls are cancelled, freeing their KV slots.
Bookkeeping once in this process: each choice's prompt is checked here, before the
Serve hop (cluster/engine/prompts.py says what the router checks again and why), and
`active` is the one count of requests in flight (admission, drain, the controller's view).
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import AsyncIterator, Awaitable, Callable

from cluster.engine import SamplingParams
from cluster.engine.grammar import GrammarSpec
from cluster.engine.grammar import check as check_grammar
from cluster.engine.prompts import PromptChecker
from cluster.loader import open_model
from cluster.tokenizer import TextTokenizer
from deployments import metrics
from deployments.api.chat import ChatTemplates
from deployments.api import reasoning
from deployments.api.chat_reply import ChatReply, detect_reasoning, detect_tool_parser
from deployments.api.reply_view import ReplyView
from deployments.api.errors import ApiError, overloaded
from deployments.api.tool_parsers import forced_call
from deployments.api.responses import ChoiceResult, TokenText
from deployments.api.router_client import RouterClient
from deployments.api.schema import ChatCompletionRequest, CompletionRequest
from deployments.config import AppConfig
from deployments.tokens.sink import TokenSink


def cut_off() -> ApiError:
    return ApiError(503, "server shut down before the request finished; retry it")


@dataclass(frozen=True)
class Choice:
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    echo_text: str = ""


class Serving:
    def __init__(self, cfg: AppConfig, routers, sink: TokenSink | None = None):
        _, _, model_cfg = open_model(cfg.model)
        self.cfg, self.model_cfg = cfg, model_cfg
        self.tokenizer = TextTokenizer.from_checkpoint(cfg.model)
        self.text = TokenText(self.tokenizer)
        self.max_model_len = min(cfg.max_model_len, model_cfg.context_limit)
        self.checker = PromptChecker(model_cfg, self.tokenizer, self.max_model_len)
        self.templates = ChatTemplates.from_checkpoint(cfg.model)
        self.tool_parser = cfg.tool_call_parser or detect_tool_parser(self.templates)
        self.reasoning = reasoning.PARSERS.get(cfg.reasoning_parser) if cfg.reasoning_parser else \
            detect_reasoning(self.templates)
        # the ids a reply writes to end its reasoning block: its grammar starts after them (reasoning_end)
        self.reasoning_end = tuple(self.tokenizer.encode(reasoning.CLOSE, add_special_tokens=False)) \
            if self.tokenizer is not None and self.reasoning == reasoning.THINK else ()
        self.client = RouterClient(routers, sink)
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")
        self.active = 0
        self.draining = False
        self.cut = asyncio.Event()  # the drain window is over: end what is still running
        self._open: set[asyncio.Queue] = set()  # the merged output queue of each request streaming now

    async def off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def check_open(self) -> None:
        """Admission: refuse when shutting down or full, else reserve a place (synchronously, so a burst
        cannot overshoot). `stream` releases it when the request ends; `release` if it never starts."""
        if self.draining:
            raise ApiError(503, "server is shutting down; send new requests elsewhere")
        if self.active >= self.cfg.routers.max * (self.cfg.max_num_seqs + self.cfg.max_queued_requests):
            raise overloaded(f"server overloaded: {self.active} requests in progress; retry later")
        self.active += 1

    def release(self) -> None:
        self.active -= 1

    async def admitted(self, make_choices: Callable[[], Awaitable[list[Choice]]]) -> list[Choice]:
        """Admission first (reserves a place), then the choices (tokenising); the place is released
        here if the request fails before it streams, else by `stream` when it ends."""
        self.check_open()
        try:
            return await make_choices()
        except BaseException:
            self.release()
            raise

    def apply_cluster_state(self, state: dict) -> None:
        """From the controller: draining refuses new requests; the cut-off ends those still running."""
        self.draining = state["draining"]
        if state["cut_off"] and not self.cut.is_set():
            self.cut.set()
            for queue in self._open:
                queue.put_nowait((None, cut_off()))

    def check_model(self, model: str | None) -> None:
        if model and model != self.cfg.model_name:
            raise ApiError(404, f"model {model[:100]!r} not found (serving {self.cfg.model_name!r})", "model")

    # -- requests → choices ----------------------------------------------------------------------
    async def completion_choices(self, req: CompletionRequest) -> list[Choice]:
        prompts = req.prompts()
        for p in prompts:
            if isinstance(p, str) and len(p) > self.cfg.max_body_bytes:
                raise ApiError(413, f"prompt over {self.cfg.max_body_bytes} characters", "prompt")
        ids = await self.off_loop(lambda: [self.checker.encode(p) for p in prompts])
        logprobs = req.logprobs
        scoring = req.echo and (logprobs is not None or req.max_tokens == 0)
        choices = []
        for i, prompt_ids in enumerate(ids):
            echo = (prompts[i] if isinstance(prompts[i], str) else self.text.decode(prompt_ids)) if req.echo else ""
            for j in range(req.n):
                params = req.sampling_params(j, 16 if req.max_tokens is None else req.max_tokens,
                                             logprobs=logprobs,
                                             prompt_logprobs=(logprobs or 0) if scoring else None)
                self.checker.validate(prompt_ids, params, "prompt")
                choices.append(Choice(i * req.n + j, prompt_ids, params, echo))
        return choices

    def chat_ids(self, messages: list[dict], **template_args) -> list[int]:
        """Render with the checkpoint's chat template, then tokenise without adding special tokens
        (the template wrote any BOS itself, as transformers' apply_chat_template does)."""
        if self.tokenizer is None:
            raise ApiError(400, "this checkpoint has no tokenizer.json: chat needs one", "messages")
        return self.tokenizer.encode(self.templates.render(messages, **template_args), add_special_tokens=False)

    def render_chat(self, req: ChatCompletionRequest) -> list[int]:
        if req.reasoning_effort is not None and not self.templates.reads("reasoning_effort",
                                                                          with_tools=req.tools is not None):
            raise ApiError(400, "reasoning_effort: this model's chat template has no reasoning effort to set",
                           "reasoning_effort")
        return self.chat_ids(req.messages_json(), tools=req.tools, documents=req.documents,
                             add_generation_prompt=req.add_generation_prompt,
                             continue_final_message=req.continue_final_message,
                             template_kwargs=req.template_kwargs())

    async def chat_choices(self, req: ChatCompletionRequest) -> list[Choice]:
        prompt_ids = await self.off_loop(self.render_chat, req)
        grammar = await self.off_loop(checked_grammar, self.request_grammar(req),
                                      "response_format" if req.forced_tools() is None else "tools")
        if grammar is not None and self.opens_thinking(prompt_ids):  # reasoning first, free; then the grammar
            grammar = replace(grammar, reasoning_end=self.reasoning_end)
        limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = limit if limit is not None else max(self.max_model_len - len(prompt_ids), 1)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        choices = []
        for j in range(req.n):
            params = req.sampling_params(j, max_tokens, logprobs=logprobs, grammar=grammar)
            self.checker.validate(prompt_ids, params, "messages")
            choices.append(Choice(j, prompt_ids, params))
        return choices

    def chat_reply(self, req: ChatCompletionRequest) -> ChatReply:
        """How the request's reply becomes its message: tool calls are read when tools are given and
        tool_choice is not none; read from the token ids where the format's markers are special tokens."""
        reply = self._reply_format(req)
        return replace(reply, view=ReplyView.needed(self.tokenizer, reply.markers))

    def _reply_format(self, req: ChatCompletionRequest) -> ChatReply:
        plain = ChatReply(reasoning=self.reasoning)
        if not req.tools or req.tool_choice == "none":
            return plain
        if req.forced_tools() is not None:
            self.request_grammar(req)  # a 400 naming the format when a forced call cannot be expressed in it
        if self.tool_parser is None:
            if req.tool_choice == "auto":
                raise ApiError(400, "tool_choice: this model's chat template renders no tool-call format we know; "
                                    "set tool_call_parser in the config (or --tool-call-parser)", "tool_choice")
            return plain  # tools are only shown to the model, as before
        return replace(plain, parser=self.tool_parser, schemas=req.tool_schemas(), parallel=req.parallel_tool_calls)

    def request_grammar(self, req: ChatCompletionRequest) -> GrammarSpec | None:
        """What the reply must follow: the response_format's JSON, or a call (tool_choice required / named)
        in the model's format with the tools' parameter schemas."""
        forced = req.forced_tools()
        if forced is None:
            return req.response_format.grammar() if req.response_format else None
        if self.tool_parser is None:
            raise ApiError(400, "tool_choice: required / a named function needs the model's call format, and "
                                "this model's chat template renders none we know; set tool_call_parser in the "
                                "config (or --tool-call-parser)", "tool_choice")
        try:
            return forced_call(self.tool_parser, req.tool_schemas(), forced)
        except ValueError as e:
            raise ApiError(400, f"tool_choice: cannot force a call in this model's format "
                                f"({self.tool_parser}): {e}", "tool_choice") from None

    def opens_thinking(self, prompt_ids: list[int]) -> bool:
        """Whether the rendered prompt left a <think> block open (R1, V3.1 thinking): the reply starts in it."""
        return self.reasoning == reasoning.THINK and reasoning.opens_thinking(self.text.decode(prompt_ids[-16:]))

    def tokenize(self, req) -> list[int]:
        """POST /tokenize: exactly the ids the model would receive (vLLM's shape)."""
        if req.prompt is not None:
            return self.checker.encode(req.prompt)
        return self.chat_ids([m.model_dump(exclude_none=True) for m in req.messages], tools=req.tools,
                             add_generation_prompt=req.add_generation_prompt,
                             template_kwargs=req.chat_template_kwargs)

    def detokenize(self, tokens: list[int]) -> str:
        vocab = self.model_cfg.vocab_size
        bad = next((t for t in tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"tokens: token id {bad} is outside [0, {vocab})", "tokens")
        # special tokens kept, as vLLM's /detokenize: the text of a chat's /tokenize ids is its prompt
        return self.tokenizer.decode(tokens, skip_special_tokens=False) if self.tokenizer else ""

    # -- choices → outputs -----------------------------------------------------------------------
    async def stream(self, choices: list[Choice]) -> AsyncIterator[tuple[int, list]]:
        """(choice index, [StepOutput, ...]) as they come; raises ApiError. Every choice's router has
        admitted it before anything is yielded (first an empty batch per choice), so a request that
        cannot start fails whole, before a response is sent. Releases the admission `check_open` made."""
        deadline = time.monotonic() + self.cfg.request_timeout_s
        clock = _Clock(len(choices))
        queue: asyncio.Queue = asyncio.Queue()  # outputs, straight from the token sink; and failures
        # The timeout and the cut-off arrive in the queue like outputs: nothing per token but a get.
        timer = asyncio.get_running_loop().call_later(max(deadline - time.monotonic(), 0), queue.put_nowait,
                                                      (None, self._timed_out()))
        self._open.add(queue)
        runs = [self.client.start(c.index, c.prompt_ids, c.params, queue) for c in choices]
        try:
            await self._until(_all_admitted(runs), deadline)
            for c in choices:
                yield c.index, []
            running = len(choices)
            while running:
                index, item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item and item[-1].finish_reason:
                    running -= 1
                yield index, clock.observe(index, item)
        finally:
            timer.cancel()
            self._open.discard(queue)
            self.release()
            for run in runs:  # cancels the router calls still running: their KV cache is freed
                await run.close()

    def _timed_out(self) -> ApiError:
        return ApiError(408, f"request timed out after {self.cfg.request_timeout_s:g} s")

    async def _until(self, awaitable, deadline: float):
        """Await, unless the request times out (408) or the drain window closes (503) first. What is
        abandoned is cancelled and awaited, so nothing it started is left running."""
        task = asyncio.ensure_future(awaitable)
        cut = asyncio.ensure_future(self.cut.wait())
        try:
            done, _ = await asyncio.wait({task, cut}, timeout=max(deadline - time.monotonic(), 0),
                                         return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the client went away
            await _cancel([task])
            raise
        finally:
            cut.cancel()
        if task in done:
            return task.result()
        await _cancel([task])
        raise cut_off() if cut in done else self._timed_out()

    async def run(self, choices: list[Choice]) -> list[ChoiceResult]:
        results = {c.index: ChoiceResult(c.index, c.prompt_ids, c.echo_text) for c in choices}
        async for index, batch in self.stream(choices):
            for o in batch:
                results[index].add(o)
        return [results[c.index] for c in choices]


def checked_grammar(spec: GrammarSpec | None, field: str) -> GrammarSpec | None:
    """A request's grammar, checked (an unsupported schema feature is a 400 naming `field`); cached by schema."""
    if spec is not None:
        try:
            check_grammar(spec)
        except ValueError as e:
            raise ApiError(400, f"{field}: {e}", field) from None
    return spec


async def _cancel(tasks: list[asyncio.Future]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _all_admitted(runs: list) -> None:
    """Every choice admitted; when one fails, the others are cancelled (by the caller's cleanup)."""
    await asyncio.gather(*(run.admitted for run in runs))


class _Clock:
    """TTFT for each choice's first token, inter-token latency after (one timestamp per batch)."""

    def __init__(self, n: int):
        self.start = time.perf_counter()
        self.last = [self.start] * n
        self.index_of: dict[int, int] = {}

    def observe(self, index: int, batch: list) -> list:
        slot = self.index_of.setdefault(index, len(self.index_of))
        now = time.perf_counter()
        for o in batch:
            if o.token_id is None:
                continue
            (metrics.ITL if self.last[slot] != self.start else metrics.TTFT).observe(now - self.last[slot])
            self.last[slot] = now
            metrics.GENERATED_TOKENS.inc()
        return batch
