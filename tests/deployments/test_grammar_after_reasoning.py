"""A grammar (a forced tool call, response_format) on a reply that starts inside a reasoning block applies
only after the block's end marker, as vLLM's structured outputs wait for `is_reasoning_end`: the reasoning
is free text in reasoning_content, the call / the JSON follows it. A prompt that closed the block is
constrained from its first token, as before.

The user trial's shape: a DeepSeek-V3 checkpoint of the published shape (tiny, random weights) with
DeepSeek-R1's template (its generation prompt ends "<think>\\n") and V3.1's (thinking on or off), the demo
tokenizer with "<think>" / "</think>" added as single tokens as in DeepSeek's tokenizer. The real engine,
Serving and FastAPI app, the official openai client; no mock. The model reasons deterministically: greedy,
logit_bias +100 on " so" and +95 on "</think>", frequency_penalty 2: " so" wins until its penalty passes
5, then "</think>" ends the block; a grammar that starts at the first token forbids both.
"""
from __future__ import annotations

import asyncio
import json
import re
import shutil
from dataclasses import replace
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from cluster.engine import LLMEngine, SamplingParams
from cluster.engine.grammar import GrammarSpec
from deployments.api.schema import ChatCompletionRequest
from deployments.api.serving import Serving
from deployments.config import app_config
from tests.deployments.helpers import openai_over_engine
from tests.deployments.released_templates import DEEPSEEK_R1, DEEPSEEK_V31
from tests.helpers import DEMO
from tests.published_checkpoints import build

openai = pytest.importorskip("openai")
httpx2 = pytest.importorskip("httpx2")
pytest.importorskip("xgrammar")


class Weather(BaseModel):  # bounded (a pattern, not max_length: see test_structured_outputs.py)
    city: str = Field(pattern=r"^[A-Za-z ]{1,6}$")
    days: int = Field(ge=1, le=9)
    unit: Literal["c", "f"]


SEARCH_TOOLS = [{"type": "function", "function": {"name": "search", "parameters": Weather.model_json_schema()}},
                {"type": "function", "function": {"name": "noop", "parameters": {
                    "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}}}]
OPEN_ID, CLOSE_ID = 4096, 4097  # "<think>", "</think>" added to the demo tokenizer (vocab 4096)
SO = 521  # " so" in the demo tokenizer
REASONS = {"temperature": 0, "frequency_penalty": 2, "logit_bias": {str(SO): 100, str(CLOSE_ID): 95}}
NAMED = {"type": "function", "function": {"name": "search"}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def reasoned(text: str | None) -> bool:
    """The reasoning the biases make: " so", once or more, and nothing else."""
    return bool(re.fullmatch(r"( so)+", text or ""))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{template name: checkpoint dir}: the same weights and tokenizer, R1's or V3.1's chat template."""
    root = tmp_path_factory.mktemp("think")
    ours, _ = build("DeepSeek-V3", root / "build", overrides={"vocab_size": 4104, "eos_token_id": 0,
                                                             "bos_token_id": 0})
    tok = json.loads((DEMO / "tokenizer.json").read_text())
    tok["added_tokens"] += [{"id": OPEN_ID + i, "content": c, "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False, "special": False}
                            for i, c in enumerate(("<think>", "</think>"))]
    config = json.loads((DEMO / "tokenizer_config.json").read_text())
    out = {}
    for name, template in (("r1", DEEPSEEK_R1), ("v31", DEEPSEEK_V31)):
        path = root / name
        shutil.copytree(ours, path)
        (path / "tokenizer.json").write_text(json.dumps(tok))
        (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
        out[name] = path
    return out


@pytest.fixture(scope="module")
def engine(checkpoints):
    return LLMEngine.from_pretrained(str(checkpoints["r1"]), max_num_seqs=8)


def serving_for(path) -> Serving:
    return Serving(app_config({"model": str(path)}), type("R", (), {"options": lambda self, **kw: self})())


def run_client(serving, engine, use):
    return openai_over_engine(serving, engine, use)


def assert_search_call(choice) -> None:
    assert choice.finish_reason == "tool_calls", choice
    [call] = choice.message.tool_calls
    assert call.function.name == "search" and not choice.message.content
    Weather.model_validate_json(call.function.arguments)


def test_a_forced_call_comes_after_free_reasoning(checkpoints, engine):
    """R1 opens the block in the prompt: named and required calls, n = 2 and streamed, each reasons first
    (free text the call's grammar forbids) and then calls; the reasoning is reasoning_content."""
    serving = serving_for(checkpoints["r1"])

    async def use(client, name):
        ask = dict(model=name, messages=ASK, tools=SEARCH_TOOLS, max_tokens=300, **REASONS)
        named = await client.chat.completions.create(tool_choice=NAMED, n=2, **ask)
        required = await client.chat.completions.create(tool_choice="required", **ask)
        stream = await client.chat.completions.create(tool_choice=NAMED, stream=True, **ask)
        return named, required, [c async for c in stream]

    named, required, chunks = run_client(serving, engine, use)
    assert len(named.choices) == 2
    for choice in named.choices + required.choices:
        assert reasoned(choice.message.reasoning_content), choice.message
    for choice in named.choices:
        assert_search_call(choice)
    [call] = required.choices[0].message.tool_calls
    assert required.choices[0].finish_reason == "tool_calls" and call.function.name in ("search", "noop")
    if call.function.name == "search":
        Weather.model_validate_json(call.function.arguments)
    else:
        assert isinstance(json.loads(call.function.arguments)["ok"], bool)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert reasoned("".join(getattr(d, "reasoning_content", None) or "" for d in deltas))
    calls = [t for d in deltas for t in (d.tool_calls or [])]
    assert [t.function.name for t in calls if t.function.name] == ["search"]
    Weather.model_validate_json("".join(t.function.arguments or "" for t in calls))
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_response_format_json_comes_after_free_reasoning(checkpoints, engine):
    """`chat.completions.parse` gets its model back (parsed was None when the JSON was written inside the
    block); json_object alike."""
    serving = serving_for(checkpoints["r1"])

    async def use(client, name):
        parsed = await client.chat.completions.parse(model=name, messages=ASK, response_format=Weather,
                                                     max_tokens=300, **REASONS)
        any_json = await client.chat.completions.create(model=name, messages=ASK, max_tokens=300,
                                                        response_format={"type": "json_object"}, **REASONS)
        return parsed, any_json

    parsed, any_json = run_client(serving, engine, use)
    message = parsed.choices[0].message
    assert isinstance(message.parsed, Weather) and reasoned(message.reasoning_content), message
    assert parsed.choices[0].finish_reason == "stop"
    message = any_json.choices[0].message
    assert reasoned(message.reasoning_content), message
    if any_json.choices[0].finish_reason == "stop":  # an unbounded object may run to max_tokens (greedy)
        assert isinstance(json.loads(message.content), dict)
    else:
        assert message.content.startswith("{")


def test_a_prompt_that_closed_the_block_is_constrained_from_its_first_token(checkpoints, engine):
    """V3.1: thinking on opens the block in the prompt (reasoning, then the call); thinking off closes it
    ("</think>"): the call from the first token, the same biases notwithstanding, and no reasoning."""
    serving = serving_for(checkpoints["v31"])
    assert serving.tool_parser == "deepseek_v31"

    def spec(thinking: bool) -> GrammarSpec:
        req = ChatCompletionRequest(messages=ASK, tools=SEARCH_TOOLS, tool_choice=NAMED,
                                    chat_template_kwargs={"thinking": thinking})
        return asyncio.run(serving.chat_choices(req))[0].params.grammar

    assert spec(True).reasoning_end == (CLOSE_ID,) and spec(False).reasoning_end == ()
    assert replace(spec(True), reasoning_end=()) == spec(False)

    async def use(client, name):
        ask = dict(model=name, messages=ASK, tools=SEARCH_TOOLS, tool_choice=NAMED, max_tokens=300, **REASONS)
        thinking = await client.chat.completions.create(extra_body={"chat_template_kwargs": {"thinking": True}},
                                                        **ask)
        plain = await client.chat.completions.create(extra_body={"chat_template_kwargs": {"thinking": False}},
                                                     **ask)
        return thinking, plain

    thinking, plain = run_client(serving, engine, use)
    assert_search_call(thinking.choices[0])
    assert reasoned(thinking.choices[0].message.reasoning_content)
    assert_search_call(plain.choices[0])
    assert getattr(plain.choices[0].message, "reasoning_content", None) is None


def test_reasoning_cut_off_by_max_tokens_ends_with_length_and_no_call(checkpoints, engine):
    """A reply that never ends its block within max_tokens: finish_reason length, no call, all reasoning
    (vLLM's behaviour); the grammar never started, so the reasoning is the model's free text."""
    serving = serving_for(checkpoints["r1"])

    async def use(client, name):
        return await client.chat.completions.create(
            model=name, messages=ASK, tools=SEARCH_TOOLS, tool_choice=NAMED, max_tokens=6, temperature=0,
            logit_bias={str(SO): 100})

    out = run_client(serving, engine, use)
    choice = out.choices[0]
    assert choice.finish_reason == "length" and not choice.message.tool_calls
    assert choice.message.reasoning_content == " so" * 6 and choice.message.content == ""


def test_preempted_sequences_keep_their_grammar_state(checkpoints, engine):
    """The engine alone, sampled: sequences preempted and recomputed under a tiny KV cache give the same ids
    as a roomy engine's; each is " so"s (free), "</think>", then JSON valid against the schema."""
    from cluster.model.kv_cache import kv_bytes_per_token

    serving = serving_for(checkpoints["r1"])
    prompt = serving.render_chat(ChatCompletionRequest(messages=ASK))
    spec = replace(GrammarSpec.json_schema(Weather.model_json_schema()), reasoning_end=(CLOSE_ID,))
    params = [SamplingParams(max_tokens=120, temperature=1.0, seed=seed, frequency_penalty=2.0,
                             logit_bias=((SO, 100.0), (CLOSE_ID, 95.0)), grammar=spec) for seed in range(4)]
    expected = [o.token_ids for o in engine.generate([prompt] * 4, params)]
    per_block = kv_bytes_per_token(engine.cfg, engine.kv_dtype) * 4
    blocks = -(-(len(prompt) + 60) // 4) * 2  # room for two of the four at a time, then some give way
    tight = LLMEngine(engine.cfg, engine.model, engine.tokenizer, max_num_seqs=4, max_model_len=engine.max_model_len,
                      block_size=4, kv_cache_memory_bytes=blocks * per_block, cuda_graphs=False,
                      generation=engine.generation)
    outs = tight.generate([prompt] * 4, params)
    assert [o.token_ids for o in outs] == expected
    assert tight.scheduler.num_preemptions > 0
    for o in outs:
        end = o.token_ids.index(CLOSE_ID)
        assert end > 0 and set(o.token_ids[:end]) == {SO}, o.token_ids
        assert o.finish_reason == "stop" and o.token_ids[-1] == 0
        Weather.model_validate_json(engine.tokenizer.decode(o.token_ids[end + 1:-1]))
    assert len({tuple(o.token_ids) for o in outs}) > 1  # sampled, not one reply


def test_a_grammar_without_reasoning_end_constrains_the_first_token(engine):
    """In the engine: the same biases, no reasoning_end: the first token is the JSON's, never " so"."""
    spec = GrammarSpec.json_schema(Weather.model_json_schema())
    params = SamplingParams(max_tokens=120, temperature=0, frequency_penalty=2.0,
                            logit_bias=((SO, 100.0), (CLOSE_ID, 95.0)), grammar=spec)
    free = replace(params, grammar=replace(spec, reasoning_end=(CLOSE_ID,)))
    closed, opened = engine.generate([[5, 6, 7]] * 2, [params, free])
    Weather.model_validate_json(closed.text)
    assert opened.token_ids[0] == SO and CLOSE_ID in opened.token_ids
    assert opened.token_ids.count(CLOSE_ID) == 1
