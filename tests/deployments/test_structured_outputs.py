"""Structured outputs: response_format json_object / json_schema constrain decoding with xgrammar, so
output validates by construction. A random-weight Qwen3-MoE checkpoint (transformers-written) with the
demo tokenizer samples at temperature 1; the official openai client's `chat.completions.parse` over the
real FastAPI app and Serving, whose router is the real engine in process (AsyncEngine, no Ray)."""
from __future__ import annotations

import asyncio
import json
import shutil
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from cluster.engine import LLMEngine, SamplingParams
from cluster.engine.async_engine import AsyncEngine
from cluster.engine.grammar import GrammarSpec
from deployments.api.http import build_http_app
from deployments.api.serving import Serving
from deployments.config import app_config
from tests.helpers import GeneratorClient
from tests.deployments.released_templates import QWEN3
from tests.deployments.helpers import IngressStub, openai_over_engine
from tests.helpers import DEMO

openai = pytest.importorskip("openai")
httpx2 = pytest.importorskip("httpx2")
pytest.importorskip("xgrammar")


class Weather(BaseModel):  # small, so 100 sampled replies stay cheap on a shared CPU
    # (a pattern, not max_length: xgrammar 0.2.8 lets raw control characters into length-bounded strings)
    city: str = Field(pattern=r"^[A-Za-z ]{1,6}$")
    days: int = Field(ge=1, le=9)
    unit: Literal["c", "f"]


@pytest.fixture(scope="module")
def model(checkpoint_factory, tmp_path_factory):
    """Random weights, the demo tokenizer (vocab 4096, <|endoftext|> = 0 ends a reply)."""
    root = tmp_path_factory.mktemp("structured") / "model"
    shutil.copytree(checkpoint_factory("qwen3_moe", vocab_size=4096, eos_token_id=0,
                                                    num_hidden_layers=1), root)
    shutil.copy(DEMO / "tokenizer.json", root / "tokenizer.json")
    config = json.loads((DEMO / "tokenizer_config.json").read_text())
    (root / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": QWEN3}))
    return root


def test_engine_masks_only_the_constrained_rows_of_a_batch(model):
    engine = LLMEngine.from_pretrained(str(model), max_num_seqs=8)
    spec = GrammarSpec.json_schema(Weather.model_json_schema())
    params = [SamplingParams(max_tokens=60, temperature=1.0, seed=i, grammar=spec) for i in range(4)]
    free = SamplingParams(max_tokens=10, temperature=1.0, seed=0)  # in the same batch, unconstrained
    outs = engine.generate(["Weather?"] * 5, params + [free])
    assert all(o.finish_reason == "stop" for o in outs[:4])
    for o in outs[:4]:
        Weather.model_validate_json(o.text)
    unconstrained = LLMEngine.from_pretrained(str(model)).generate(["Weather?"], free)[0]
    assert outs[4].token_ids == unconstrained.token_ids  # a sequence without a grammar is not touched


def test_properties_come_in_the_schemas_order(model):
    """As OpenAI and xgrammar write them (a sorted copy of the schema wrote "alpha" before "zeta", and a
    forced hermes call as {"arguments", "name"}, the reverse of what the template teaches)."""
    schema = {"type": "object", "properties": {"zeta": {"type": "boolean"}, "alpha": {"type": "boolean"}},
              "required": ["zeta", "alpha"], "additionalProperties": False}
    engine = LLMEngine.from_pretrained(str(model), max_num_seqs=4)
    params = [SamplingParams(max_tokens=40, temperature=1.0, seed=i, grammar=GrammarSpec.json_schema(schema))
              for i in range(3)]
    for out in engine.generate(["Flags?"] * 3, params):
        assert list(json.loads(out.text)) == ["zeta", "alpha"], out.text


@pytest.fixture(scope="module")
def served(model):
    serving = Serving(app_config({"model": str(model)}), type("R", (), {"options": lambda self, **kw: self})())
    return serving, LLMEngine.from_pretrained(str(model), max_num_seqs=100)


def run_client(served, use):
    serving, engine = served
    return openai_over_engine(serving, engine, use)


def test_openai_parse_with_a_pydantic_model_validates_100_of_100(served):
    async def use(client, name):
        async def one(seed):
            return await client.chat.completions.parse(
                model=name, messages=[{"role": "user", "content": "Weather in Paris?"}], response_format=Weather,
                temperature=1.0, seed=seed, max_tokens=60)
        return await asyncio.gather(*(one(seed) for seed in range(100)))

    results = run_client(served, use)
    assert all(isinstance(r.choices[0].message.parsed, Weather) for r in results)
    assert len({r.choices[0].message.content for r in results}) > 10  # sampled, not one answer


def test_json_object_and_an_unsupported_schema(served):
    async def use(client, name):
        out = await client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "x"}], response_format={"type": "json_object"},
            temperature=1.0, seed=3, max_tokens=300, extra_body={"top_k": 20})
        with pytest.raises(openai.BadRequestError) as e:
            await client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": "x"}], response_format={
                    "type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "object", "properties": {
                        "a": {"$ref": "#/definitions/missing"}}}}})
        return out, e.value

    out, error = run_client(served, use)
    assert isinstance(json.loads(out.choices[0].message.content), dict)
    assert error.status_code == 400 and "response_format" in str(error)


SEARCH_TOOLS = [{"type": "function", "function": {"name": "search", "parameters": Weather.model_json_schema()}},
                {"type": "function", "function": {"name": "noop", "parameters": {
                    "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}}}]


def test_tool_choice_required_and_named_return_a_call_whose_arguments_validate(served):
    async def use(client, name):
        ask = dict(model=name, messages=[{"role": "user", "content": "Weather?"}], tools=SEARCH_TOOLS,
                   temperature=1.0, max_tokens=80)
        required = await asyncio.gather(*(client.chat.completions.create(tool_choice="required", seed=s, **ask)
                                          for s in range(4)))
        named = await client.chat.completions.create(
            tool_choice={"type": "function", "function": {"name": "search"}}, seed=9, **ask)
        stream = await client.chat.completions.create(
            tool_choice={"type": "function", "function": {"name": "search"}}, seed=5, stream=True, **ask)
        return required, named, [c async for c in stream]

    required, named, chunks = run_client(served, use)
    for out in required + [named]:
        assert out.choices[0].finish_reason == "tool_calls"
        call = out.choices[0].message.tool_calls[0]
        if call.function.name == "search":
            Weather.model_validate_json(call.function.arguments)
        else:
            assert call.function.name == "noop" and isinstance(json.loads(call.function.arguments)["ok"], bool)
    assert named.choices[0].message.tool_calls[0].function.name == "search"
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert [d.function.name for d in deltas if d.function.name] == ["search"]
    Weather.model_validate_json("".join(d.function.arguments or "" for d in deltas))


def test_langchain_openai_bind_tools_and_with_structured_output(served):
    """langchain-openai (a client nobody here wrote) over real HTTP: uvicorn on 127.0.0.1 serving the app."""
    import socket
    import threading

    import uvicorn
    lc = pytest.importorskip("langchain_openai")

    serving, engine = served
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_http_app(IngressStub(serving)), host="127.0.0.1", port=port,
                                           log_level="warning"))
    serving.cut = asyncio.Event()
    started = threading.Event()

    def serve():
        async def main():
            async_engine = AsyncEngine(engine)  # its streams belong to this loop
            serving.client = GeneratorClient(async_engine.generate, async_engine.shutdown)
            started.set()
            await server.serve()
        asyncio.run(main())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    started.wait(30)
    try:
        while not server.started:
            threading.Event().wait(0.05)
        llm = lc.ChatOpenAI(model=serving.cfg.model_name, base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                            temperature=1.0, max_tokens=80, max_retries=0, seed=1)
        structured = llm.with_structured_output(Weather, method="json_schema", strict=True).invoke("Weather?")
        assert isinstance(structured, Weather)
        message = llm.bind_tools([SEARCH_TOOLS[0]], tool_choice="search").invoke("Weather in Paris?")
        assert [c["name"] for c in message.tool_calls] == ["search"]
        Weather.model_validate(message.tool_calls[0]["args"])
    finally:
        server.should_exit = True
        thread.join(30)
        serving.client.shutdown()


@pytest.mark.parametrize("parser", ["glm45", "kimi_k2", "openai"])
def test_every_call_format_forces_a_valid_call_streaming_and_not(served, parser):
    """The same model served with a family's parser (tool_call_parser): required and named calls come back
    in that format, parsed, with arguments that validate. One format of each shape (bare-text arguments,
    the name outside the JSON, harmony channels; hermes above); every format's grammar is walked in
    test_forced_calls.py."""
    serving, engine = served
    other = Serving(app_config({"model": serving.cfg.model, "tool_call_parser": parser}),
                    type("R", (), {"options": lambda self, **kw: self})())

    async def use(client, name):
        ask = dict(model=name, messages=[{"role": "user", "content": "Weather?"}], temperature=1.0)
        # DeepSeek's markers are ~60 byte tokens here, and the context is 512: the named call gets one tool
        required = await client.chat.completions.create(tool_choice="required", seed=1, tools=SEARCH_TOOLS,
                                                        max_tokens=150, **ask)
        stream = await client.chat.completions.create(
            tool_choice={"type": "function", "function": {"name": "search"}}, seed=2, stream=True,
            tools=SEARCH_TOOLS[:1], max_tokens=210, **ask)
        return required, [c async for c in stream]

    required, chunks = run_client((other, engine), use)
    assert required.choices[0].message.tool_calls, required.choices[0].message.content
    call = required.choices[0].message.tool_calls[0]
    assert required.choices[0].finish_reason == "tool_calls" and call.function.name in ("search", "noop")
    if call.function.name == "search":
        Weather.model_validate_json(call.function.arguments)
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert [d.function.name for d in deltas if d.function.name] == ["search"]
    Weather.model_validate_json("".join(d.function.arguments or "" for d in deltas))
