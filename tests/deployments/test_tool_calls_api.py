"""Tool calls through the HTTP API with the official openai client, non-streaming and streaming.

In process (no Ray): the real FastAPI app and Serving over the demo checkpoint given a Qwen3-shaped
template (so the hermes parser is detected); only the routers are replaced, by a scripted model that
emits a fixed reply token by token through the demo tokenizer, as a router streams StepOutputs."""
from __future__ import annotations

import json
import shutil

import pytest

from deployments.api.serving import Serving
from deployments.config import app_config
from tests.deployments.helpers import MESSAGES, TOOLS, WEATHER, ask
from tests.deployments.released_templates import QWEN3
from tests.helpers import DEMO

openai = pytest.importorskip("openai")
httpx2 = pytest.importorskip("httpx2")

TWO_CALLS = ("Let me check.\n<tool_call>\n" + json.dumps({"name": "get_weather", "arguments": WEATHER},
                                                         ensure_ascii=False)
             + "\n</tool_call>\n<tool_call>\n{\"name\": \"search\", \"arguments\": {\"query\": \"x\"}}\n</tool_call>")


@pytest.fixture(scope="module")
def serving(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3") / "model"
    shutil.copytree(DEMO, root)
    config = json.loads((root / "tokenizer_config.json").read_text())
    (root / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": QWEN3}))
    return Serving(app_config({"model": str(root)}), type("R", (), {"options": lambda self, **kw: self})())


def test_the_parser_is_detected_from_the_template(serving):
    assert serving.tool_parser == "hermes"


def test_calls_non_streaming(serving):
    out = ask(serving, TWO_CALLS, tools=TOOLS)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    calls = choice.message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather", "search"]
    assert json.loads(calls[0].function.arguments) == WEATHER and json.loads(calls[1].function.arguments) == {
        "query": "x"}
    assert all(c.id.startswith("call_") and c.type == "function" for c in calls) and calls[0].id != calls[1].id


def test_parallel_tool_calls_false_keeps_the_first(serving):
    out = ask(serving, TWO_CALLS, tools=TOOLS, parallel_tool_calls=False)
    assert [c.function.name for c in out.choices[0].message.tool_calls] == ["get_weather"]


def test_tool_choice_none_and_no_tools_leave_the_text_alone(serving):
    for kwargs in ({"tools": TOOLS, "tool_choice": "none"}, {}):
        out = ask(serving, TWO_CALLS, **kwargs)
        assert out.choices[0].message.content == TWO_CALLS and not out.choices[0].message.tool_calls
        assert out.choices[0].finish_reason == "stop"


def test_a_call_cut_off_by_max_tokens_is_content(serving):
    cut = ask(serving, TWO_CALLS, tools=TOOLS, max_tokens=30)
    assert cut.choices[0].finish_reason == "length" and not cut.choices[0].message.tool_calls
    assert TWO_CALLS.startswith(cut.choices[0].message.content) and "<tool_call>" in cut.choices[0].message.content


def test_calls_streaming_in_openais_delta_shape(serving):
    chunks = ask(serving, TWO_CALLS, tools=TOOLS, stream=True)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert content.rstrip() == "Let me check." and "<tool_call" not in content
    names = [d for d in deltas if d.function.name]
    assert [(d.index, d.function.name) for d in names] == [(0, "get_weather"), (1, "search")]
    assert all(d.id and d.type == "function" for d in names)
    arguments = ["".join(d.function.arguments or "" for d in deltas if d.index == i) for i in (0, 1)]
    assert json.loads(arguments[0]) == WEATHER and json.loads(arguments[1]) == {"query": "x"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_streaming_without_calls_is_the_whole_text(serving):
    text = "No tools needed <tool_ca"  # a marker's beginning at the end, held back then sent
    chunks = ask(serving, text, tools=TOOLS, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    cut = ask(serving, TWO_CALLS, tools=TOOLS, stream=True, max_tokens=30)
    assert TWO_CALLS.startswith("".join(c.choices[0].delta.content or "" for c in cut if c.choices))
    assert not any(c.choices[0].delta.tool_calls for c in cut if c.choices)


def test_forced_tool_choice_becomes_a_grammar_in_the_models_call_format(serving, tmp_path):
    from deployments.api.schema import ChatCompletionRequest

    named = serving.request_grammar(ChatCompletionRequest(messages=MESSAGES, tools=TOOLS, tool_choice={
        "type": "function", "function": {"name": "search"}}))
    assert (named.prefix, named.suffix) == ("<tool_call>\n", "\n</tool_call>")
    assert json.loads(named.schema)["properties"]["name"] == {"const": "search"}
    required = serving.request_grammar(ChatCompletionRequest(messages=MESSAGES, tools=TOOLS, tool_choice="required"))
    assert [c["properties"]["name"]["const"] for c in json.loads(required.schema)["anyOf"]] == ["get_weather",
                                                                                               "search"]
    with pytest.raises(openai.BadRequestError) as e:  # not one of the tools
        ask(serving, TWO_CALLS, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    assert "tool_choice" in str(e.value)


def test_forced_tool_choice_a_format_cannot_express_is_a_400_naming_it():
    """GLM-4.5 writes string arguments bare: a length-bounded string cannot be forced in it."""
    from deployments.api.errors import ApiError
    from deployments.api.schema import ChatCompletionRequest

    glm = Serving(app_config({"model": str(DEMO), "tool_call_parser": "glm45"}),
                  type("R", (), {"options": lambda self, **kw: self})())
    bounded = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"q": {"type": "string", "maxLength": 9}}}}}]
    with pytest.raises(ApiError) as e:
        glm.chat_reply(ChatCompletionRequest(messages=MESSAGES, tools=bounded, tool_choice="required"))
    assert e.value.status == 400 and e.value.param == "tool_choice" and "glm45" in e.value.message
    assert "maxLength" in e.value.message
    assert glm.request_grammar(ChatCompletionRequest(messages=MESSAGES, tools=TOOLS, tool_choice="required"))


def test_auto_on_a_model_without_a_known_call_format_is_a_400_naming_tool_choice():
    """The demo checkpoint has no template (the plain default renders no call format): unset tool_choice
    shows the tools to the model only; an explicit auto is refused, pointing at tool_call_parser."""
    from deployments.api.errors import ApiError
    from deployments.api.schema import ChatCompletionRequest

    plain = Serving(app_config({"model": str(DEMO)}), type("R", (), {"options": lambda self, **kw: self})())
    assert plain.tool_parser is None
    assert plain.chat_reply(ChatCompletionRequest(messages=MESSAGES, tools=TOOLS)).parser is None
    with pytest.raises(ApiError) as e:
        plain.chat_reply(ChatCompletionRequest(messages=MESSAGES, tools=TOOLS, tool_choice="auto"))
    assert e.value.status == 400 and e.value.param == "tool_choice" and "tool_call_parser" in e.value.message
    forced = Serving(app_config({"model": str(DEMO), "tool_call_parser": "mistral"}),
                     type("R", (), {"options": lambda self, **kw: self})())
    assert forced.chat_reply(ChatCompletionRequest(messages=MESSAGES, tools=TOOLS, tool_choice="auto")).parser \
        == "mistral"


def test_an_unknown_tool_call_parser_is_refused_by_name():
    with pytest.raises(ValueError, match="tool_call_parser 'nope' is not one of"):
        app_config({"model": str(DEMO), "tool_call_parser": "nope"})
