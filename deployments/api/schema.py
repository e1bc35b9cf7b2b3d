"""OpenAI-compatible request shapes (pydantic) and their mapping to the engine's SamplingParams.

Every field here is honoured; a field not listed is refused with a 400 naming it
(`extra="forbid"`), so nothing a client sends is silently ignored. Extensions
beyond OpenAI, as vLLM names them: `top_k`, `min_tokens`, `repetition_penalty`,
`stop_token_ids`, `ignore_eos`, `chat_template_kwargs`, `documents`,
`add_generation_prompt`, `continue_final_message`; ours: `return_routing`.
"""
from __future__ import annotations

import random
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cluster.engine import InvalidRequest, SamplingParams
from cluster.engine.grammar import GrammarSpec
from cluster.engine.params import MAX_LOGPROBS, SEED_MAX, SEED_MIN
from deployments.field_types import NoGuessing

MAX_N = 16  # choices per prompt (and prompts per request)


class _Body(NoGuessing):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingFields(_Body):
    model: str | None = None
    max_tokens: int | None = Field(None, description="new tokens to generate (completions default 16; chat: the "
                                                     "rest of the context)")
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_tokens: int = 0
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    return_routing: bool = False
    user: str | None = Field(None, max_length=256, description="an end-user id for your own logs; changes nothing")

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    def _bias(self) -> tuple[tuple[int, float], ...]:
        out = []
        for key, bias in (self.logit_bias or {}).items():
            if not key.lstrip("-").isdigit():
                raise InvalidRequest(f"logit_bias: keys must be token ids, got {key[:40]!r}", "logit_bias")
            out.append((int(key), bias))
        return tuple(out)

    def sampling_params(self, index: int, max_tokens: int, *, logprobs: int | None = None,
                        prompt_logprobs: int | None = None, grammar: GrammarSpec | None = None) -> SamplingParams:
        """The params of choice `index` (n > 1: seed + index). Every request gets a seed so that a
        request resumed on another router replays exactly. temperature / top_p / top_k stay None when
        the request gives none: the router's engine fills them from the checkpoint's
        generation_config.json, as vLLM does, else OpenAI's defaults (LLMEngine.with_defaults)."""
        seed = random.getrandbits(63) if self.seed is None else (self.seed + index) % 2**64
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=seed, stop=stop, stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos, min_tokens=self.min_tokens, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
            logit_bias=self._bias(), return_routing=self.return_routing, grammar=grammar)


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt_shape(cls, prompt, handler):
        """One sentence for a prompt of no allowed shape: pydantic named the first of four
        (`prompt.str: Input should be a valid string` for a batch mixing text and token ids)."""
        try:
            return handler(prompt)
        except ValidationError:
            raise ValueError("a string, a list of token ids, or a list of either (one kind per batch: "
                             "strings or token-id lists, not both)") from None

    @field_validator("prompt")
    @classmethod
    def _prompt_count(cls, prompt):
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) and len(prompt) > MAX_N:
            raise ValueError(f"at most {MAX_N} prompts per request")
        return prompt

    @model_validator(mode="after")
    def _best_of(self):
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported")
        return self

    def prompts(self) -> list[str | list[int]]:
        """A batch of prompts as the completions API allows: a string, token ids, or a list of either."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            return list(p)
        return [p]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str | None = None
    type: str = "function"
    function: dict[str, Any]


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    @model_validator(mode="after")
    def _content_present(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (null only for an assistant turn with tool_calls)")
        return self


class JsonSchemaFormat(_Body):
    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"] = Field(
        description="json_object: any JSON object; json_schema: JSON valid against json_schema.schema "
                    "(decoding is constrained by a grammar, strict or not)")
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given with type json_schema, and only then")  # the field name comes from loc
        return self

    def grammar(self) -> GrammarSpec | None:
        if self.type == "json_object":
            return GrammarSpec.json_object()
        if self.type == "json_schema":
            return GrammarSpec.json_schema(self.json_schema.schema_)
        return None


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="default: auto with tools (calls are read from the reply by the model's tool-call "
                          "parser), none without; required and a named function constrain decoding to a call "
                          "(400 where the model's call format is unknown: set tool_call_parser)")
    parallel_tool_calls: bool = Field(True, description="false: at most one call per reply (the first)")
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = Field(
        None, description="given to the chat template as its `reasoning_effort` variable, as transformers' "
                          "apply_chat_template(reasoning_effort=...) does (gpt-oss: low, medium, high); "
                          "400 where the model's template reads no such variable")
    documents: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    @model_validator(mode="after")
    def _checks(self):
        if self.tool_choice not in (None, "none") and not self.tools:
            raise ValueError("tool_choice: needs tools")
        if self.forced_tools() is not None and self.response_format and self.response_format.type != "text":
            raise ValueError("response_format: give either a JSON response_format or a forced tool_choice")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_LOGPROBS:  # else named `logprobs`
            raise ValueError(f"top_logprobs: must be between 0 and {MAX_LOGPROBS}")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("max_completion_tokens: give it or max_tokens, not both")
        given = (self.chat_template_kwargs or {}).get("reasoning_effort", self.reasoning_effort)
        if self.reasoning_effort is not None and given != self.reasoning_effort:
            raise ValueError("reasoning_effort: chat_template_kwargs sets another one")
        return self

    def template_kwargs(self) -> dict[str, Any] | None:
        """chat_template_kwargs, with reasoning_effort among them when it is given."""
        if self.reasoning_effort is None:
            return self.chat_template_kwargs
        return {**(self.chat_template_kwargs or {}), "reasoning_effort": self.reasoning_effort}

    def tool_schemas(self) -> dict[str, dict[str, Any]]:
        """Each tool's parameter schema by function name (what the bare-text call formats read types from)."""
        out = {}
        for tool in self.tools or []:
            function = tool.get("function") if isinstance(tool.get("function"), dict) else tool
            if isinstance(function.get("name"), str):
                out[function["name"]] = function.get("parameters") if isinstance(function.get("parameters"),
                                                                                  dict) else {}
        return out

    def forced_tools(self) -> list[str] | None:
        """The function names a call must use: all (required), one (named), or None (no call is forced)."""
        if self.tool_choice == "required":
            return list(self.tool_schemas())
        if isinstance(self.tool_choice, NamedToolChoice):
            if self.tool_choice.function.name not in self.tool_schemas():
                raise ValueError(f"tool_choice: function {self.tool_choice.function.name[:64]!r} is not in tools")
            return [self.tool_choice.function.name]
        return None

    def messages_json(self) -> list[dict[str, Any]]:
        return [m.model_dump(exclude_none=True) for m in self.messages]


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _one(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("prompt: give exactly one of prompt and messages")
        return self


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]
