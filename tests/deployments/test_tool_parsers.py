"""deployments/api/tool_parsers on the exact text each family's (released-shaped) chat template renders for
an assistant's tool calls, rendered by transformers' apply_chat_template: what a model trained on that
template writes back. Pure and fast (no Ray)."""
from __future__ import annotations

import json

import pytest

from deployments.api.tool_parsers import detect, parse
from tests.deployments.released_templates import BY_FAMILY
from tests.deployments.helpers import checkpoint

# family -> (its parser, the header of an assistant turn, what ends one)
FAMILIES = {
    "qwen3": ("hermes", "<|im_start|>assistant\n", "<|im_end|>\n"),
    "qwen3_coder": ("qwen3_coder", "<|im_start|>assistant\n", "<|im_end|>\n"),
    "deepseek_v3": ("deepseek_v3", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"),
    "deepseek_r1": ("deepseek_v3", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"),
    "deepseek_v31": ("deepseek_v31", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"),
    "kimi_k2": ("kimi_k2", "<|im_assistant|>assistant<|im_middle|>", "<|im_end|>"),
    "glm45": ("glm45", "<|assistant|>\n", ""),
    "mistral": ("mistral", "", "<|endoftext|>"),
    "gpt_oss": ("openai", "<|start|>assistant", ""),
}
WEATHER = {"city": "Zürich 東京", "days": 3, "options": {"units": ["c", "f"], "deep": {"x": 1.5, "ok": True,
                                                                                     "none": None}}}
SEARCH = {"query": "a \"quoted\" <b>tag</b> & 'x' \\ back", "limit": 10}
SCHEMAS = {
    "get_weather": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                                     "options": {"type": "object"}}},
    "search": {"type": "object", "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}}},
}
USER = [{"role": "user", "content": "Weather in Zürich, and search the web"}]


def call(i: int, name: str, arguments: dict) -> dict:
    return {"id": f"functions.{name}:{i}", "type": "function", "function": {"name": name, "arguments": arguments}}


def rendered_reply(tmp_path, family: str, content: str, calls: list[dict]) -> str:
    """The assistant turn as the family's template renders it, without its header and end marker."""
    tok, _ = checkpoint(tmp_path, BY_FAMILY[family])
    _, header, end = FAMILIES[family]
    before = tok.apply_chat_template(USER, tokenize=False)
    full = tok.apply_chat_template(USER + [{"role": "assistant", "content": content, "tool_calls": calls}],
                                   tokenize=False)
    assert full.startswith(before)
    reply = full[len(before):]
    assert reply.startswith(header) and reply.endswith(end), reply
    return reply[len(header):len(reply) - len(end)]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_parser_is_detected_from_the_template(family):
    assert detect(BY_FAMILY[family]) == FAMILIES[family][0]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_several_calls_with_nested_json_and_unicode(tmp_path, family):
    reply = rendered_reply(tmp_path, family, "", [call(0, "get_weather", WEATHER), call(1, "search", SEARCH)])
    parsed = parse(reply, FAMILIES[family][0], SCHEMAS)
    assert [c.name for c in parsed.calls] == ["get_weather", "search"], reply
    assert [json.loads(c.arguments) for c in parsed.calls] == [WEATHER, SEARCH]
    assert parsed.content == ""
    if family == "kimi_k2":  # the model writes its own ids
        assert [c.id for c in parsed.calls] == ["functions.get_weather:0", "functions.search:1"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_call_cut_off_by_max_tokens_is_content(tmp_path, family):
    reply = rendered_reply(tmp_path, family, "", [call(0, "get_weather", WEATHER), call(1, "search", SEARCH)])
    for cut in (reply.index("10") + 1, reply.index("back"), reply.index("Zürich") + 3):
        parsed = parse(reply[:cut], FAMILIES[family][0], SCHEMAS)
        if family == "gpt_oss":  # harmony messages stand alone: calls before the cut one are whole calls
            assert all(json.loads(c.arguments) == WEATHER for c in parsed.calls)
            assert reply[:cut].endswith(parsed.content) and parsed.content.startswith("{")
        else:
            assert parsed.calls == () and parsed.content == reply[:cut]


@pytest.mark.parametrize("family", ["qwen3", "qwen3_coder", "deepseek_v3", "deepseek_v31", "kimi_k2", "glm45",
                                    "gpt_oss"])
def test_text_before_the_calls_is_content(tmp_path, family):
    reply = rendered_reply(tmp_path, family, "Let me check.", [call(0, "search", SEARCH)])
    parsed = parse(reply, FAMILIES[family][0], SCHEMAS)
    assert parsed.content == "Let me check." and json.loads(parsed.calls[0].arguments) == SEARCH


@pytest.mark.parametrize("parser", sorted({p for p, _, _ in FAMILIES.values()}))
def test_a_reply_without_calls_is_all_content(parser):
    text = "The weather is fine {\"not\": \"a call\"} <b>ok</b>"
    assert parse(text, parser, SCHEMAS).content == text and parse(text, parser, SCHEMAS).calls == ()


def test_mistral_v11_calls():
    text = '[TOOL_CALLS]get_weather[ARGS]{"city": "Zürich"}[TOOL_CALLS]search[ARGS]{"query": "x"}'
    parsed = parse(text, "mistral", SCHEMAS)
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == [("get_weather", {"city": "Zürich"}),
                                                                         ("search", {"query": "x"})]


def test_gpt_oss_analysis_is_reasoning_and_final_is_content():
    text = ("<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>final<|message|>"
            "Sunny.<|return|>")
    parsed = parse(text, "openai", SCHEMAS)
    assert (parsed.reasoning, parsed.content, parsed.calls) == ("Need weather.", "Sunny.", ())
