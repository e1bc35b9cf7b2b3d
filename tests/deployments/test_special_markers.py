"""Call and channel markers that are special tokens survive for the parser, end to end through the HTTP API.

Kimi-K2's `<|tool_calls_section_begin|>`… and gpt-oss's harmony `<|channel|>`… are special tokens of their
tokenizers, which the engine's text drops (skip_special_tokens, as a user must not see them). Each
checkpoint here is a published config (tests/published_checkpoints.py) with a tokenizer.json that holds
those markers as special tokens (the demo tokenizer plus them) and its family's template; the routers
are scripted (tests/deployments/helpers.py): they stream the reply's tokens with the text
the engine's detokenizer gives, markers dropped, and end on the family's EOS as a real reply does."""
from __future__ import annotations

import json
import shutil

import pytest
from tokenizers import AddedToken, Tokenizer

from deployments.api.serving import Serving
from deployments.config import app_config
from tests.deployments.released_templates import GPT_OSS, KIMI_K2
from tests.deployments.helpers import HARMONY_CALL, HARMONY_REPLY, TOOLS, WEATHER, ask, streamed
from tests.published_checkpoints import build
from tests.published_configs import tiny
from tests.helpers import DEMO

KIMI_SPECIALS = ["<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>",
                 "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>",
                 "<|tool_call_argument_begin|>", "<|tool_call_end|>"]
HARMONY_SPECIALS = ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>",
                    "<|call|>"]


def served(tmp_path_factory, name: str, template: str, specials: list[str]) -> Serving:
    tokenizer = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    vocab = max(tiny(name)["vocab_size"], tokenizer.get_vocab_size())  # every token id a row of the model
    root, _ = build(name, tmp_path_factory.mktemp(name), overrides={"vocab_size": vocab})
    tokenizer.save(str(root / "tokenizer.json"))
    config = json.loads((DEMO / "tokenizer_config.json").read_text())
    (root / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    shutil.copy(DEMO / "generation_config.json", root)
    return Serving(app_config({"model": str(root)}), type("R", (), {"options": lambda self, **kw: self})())


@pytest.fixture(scope="module")
def kimi(tmp_path_factory):
    return served(tmp_path_factory, "Kimi-K2-Instruct", KIMI_K2, KIMI_SPECIALS)


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    return served(tmp_path_factory, "gpt-oss-20b", GPT_OSS, HARMONY_SPECIALS)


KIMI_CALLS = ("Let me check.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
              "<|tool_call_argument_begin|>" + json.dumps(WEATHER, ensure_ascii=False) + "<|tool_call_end|>"
              "<|tool_call_begin|>functions.search:1<|tool_call_argument_begin|>{\"query\": \"x\"}<|tool_call_end|>"
              "<|tool_calls_section_end|><|im_end|>")


def test_the_markers_are_special_tokens_the_engines_text_drops(kimi, gpt_oss):
    ids = kimi.tokenizer.encode(KIMI_CALLS, add_special_tokens=False)
    assert "<|tool_call_begin|>" not in kimi.tokenizer.decode(ids)
    assert (kimi.tool_parser, gpt_oss.tool_parser) == ("kimi_k2", "openai")


def test_kimi_k2_calls_non_streaming_and_streaming(kimi):
    message = ask(kimi, KIMI_CALLS, tools=TOOLS).choices[0]
    assert message.finish_reason == "tool_calls" and message.message.content == "Let me check."
    calls = message.message.tool_calls
    assert [(c.id, c.function.name) for c in calls] == [("functions.get_weather:0", "get_weather"),
                                                        ("functions.search:1", "search")]
    assert json.loads(calls[0].function.arguments) == WEATHER
    chunks = ask(kimi, KIMI_CALLS, tools=TOOLS, stream=True)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert content == "Let me check." and [d.function.name for d in deltas if d.function.name] == [
        "get_weather", "search"]
    assert json.loads("".join(d.function.arguments or "" for d in deltas if d.index == 0)) == WEATHER


def test_kimi_k2_user_sees_no_special_tokens(kimi):
    """Without calls, and with a call cut off by max_tokens (returned as content), the user's text is the
    engine's: no special tokens in it."""
    plain = ask(kimi, "Sunny.<|im_end|>", tools=TOOLS)
    assert plain.choices[0].message.content == "Sunny." and plain.choices[0].finish_reason == "stop"
    cut = ask(kimi, KIMI_CALLS, tools=TOOLS, max_tokens=12).choices[0]
    assert cut.finish_reason == "length" and not cut.message.tool_calls and "<|" not in cut.message.content
    ids = kimi.tokenizer.encode(KIMI_CALLS, add_special_tokens=False)
    assert cut.message.content == kimi.tokenizer.decode(ids[:12])
    assert "<|" not in "".join(c.choices[0].delta.content or "" for c in
                               ask(kimi, KIMI_CALLS, tools=TOOLS, stream=True, max_tokens=12) if c.choices)


def test_gpt_oss_channels_and_call(gpt_oss):
    reply = HARMONY_REPLY
    message = ask(gpt_oss, reply).choices[0].message
    assert (message.reasoning_content, message.content) == ("User asks weather.", "Sunny.")
    assert streamed(ask(gpt_oss, reply, stream=True)) == ("User asks weather.", "Sunny.")
    call = HARMONY_CALL  # <|call|> is its EOS
    for stream in (False, True):
        out = ask(gpt_oss, call, tools=TOOLS, stream=stream)
        if stream:
            deltas = [d for c in out if c.choices for d in (c.choices[0].delta.tool_calls or [])]
            assert streamed(out)[0] == "Use search." and [d.function.name for d in deltas if d.function.name] == [
                "search"]
        else:
            assert out.choices[0].finish_reason == "tool_calls"
            assert out.choices[0].message.reasoning_content == "Use search."
            assert json.loads(out.choices[0].message.tool_calls[0].function.arguments) == {"query": "x"}


def test_kimi_k2_stop_string_ends_what_the_parser_reads(kimi):
    """A stop string ends the reply where the engine's text ends: the calls after it are neither parsed nor
    shown; with a stop string that never comes (the engine holding back what could become one) the calls
    parse as without it. Both non-streaming and streaming."""
    reply = "Let me check. STOP" + KIMI_CALLS
    for stream in (False, True):
        got = ask(kimi, reply, tools=TOOLS, stop=["STOP"], stream=stream)
        if stream:
            content = "".join(c.choices[0].delta.content or "" for c in got if c.choices)
            calls = [d for c in got if c.choices for d in (c.choices[0].delta.tool_calls or [])]
        else:
            content, calls = got.choices[0].message.content, got.choices[0].message.tool_calls
        assert content == "Let me check. " and not calls
    message = ask(kimi, KIMI_CALLS, tools=TOOLS, stop=["never said"]).choices[0]
    assert message.finish_reason == "tool_calls" and json.loads(message.message.tool_calls[0].function.arguments) == WEATHER
    chunks = ask(kimi, KIMI_CALLS, tools=TOOLS, stop=["never said"], stream=True)
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Let me check."
    assert json.loads("".join(d.function.arguments or "" for d in deltas if d.index == 0)) == WEATHER
