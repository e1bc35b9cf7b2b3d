"""Reasoning content apart from the answer: the pure split (streamed piece by piece = whole), and through
the HTTP API with the openai client for released-shaped templates (Qwen3 with enable_thinking, DeepSeek-R1
opening the block in the prompt, gpt-oss's analysis channel), with and without tool calls."""
from __future__ import annotations

import json
import shutil

import pytest

from deployments.api.reasoning import ThinkStream, split
from deployments.api.serving import Serving
from deployments.config import app_config
from tests.deployments.released_templates import DEEPSEEK_R1, GPT_OSS, QWEN3
from tests.deployments.helpers import HARMONY_CALL, HARMONY_REPLY, TOOLS, ask, streamed
from tests.helpers import DEMO

REPLIES = [
    ("<think>\nI should check.\n</think>\n\nIt is sunny.", False, ("I should check.", "It is sunny.")),
    ("I should check.\n</think>\n\nIt is sunny.", True, ("I should check.", "It is sunny.")),
    ("<think>\nStill thinking about <b>tags</b> and </thin", False, ("Still thinking about <b>tags</b> and </thin", "")),
    ("Thinking, cut off\n\n", True, ("Thinking, cut off", "")),
    ("\n\nNo thinking here, <think> later is text", False, (None, "\n\nNo thinking here, <think> later is text")),
    ("<thi", False, (None, "<thi")),
    ("<think></think>Answer", False, ("", "Answer")),
]


@pytest.mark.parametrize("text, opened, expected", REPLIES)
def test_split_and_its_stream_agree_at_every_piece_size(text, opened, expected):
    assert split(text, opened) == expected
    for size in (1, 2, 3, 7, len(text)):
        stream = ThinkStream(opened)
        pieces = [stream.feed(text[i:i + size]) for i in range(0, len(text), size)] + [stream.finish()]
        reasoning, content = "".join(r for r, _ in pieces), "".join(c for _, c in pieces)
        assert (reasoning, content) == (expected[0] or "", expected[1]), size


def serving_with(tmp_path_factory, template: str, **cfg) -> Serving:
    root = tmp_path_factory.mktemp("reasoning") / "model"
    shutil.copytree(DEMO, root)
    config = json.loads((root / "tokenizer_config.json").read_text())
    (root / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return Serving(app_config({"model": str(root), **cfg}), type("R", (), {"options": lambda self, **kw: self})())


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return serving_with(tmp_path_factory, QWEN3)


def test_qwen3_thinking_is_reasoning_content(qwen3):
    reply = "<think>\nThe user wants weather.\n</think>\n\nIt is sunny in Zürich."
    message = ask(qwen3, reply).choices[0].message
    assert (message.reasoning_content, message.content) == ("The user wants weather.", "It is sunny in Zürich.")
    assert streamed(ask(qwen3, reply, stream=True)) == ("The user wants weather.", "It is sunny in Zürich.")


def test_qwen3_enable_thinking_false_reaches_the_template_and_the_reply_is_content(qwen3):
    out = ask(qwen3, "It is sunny.", extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert out.choices[0].message.content == "It is sunny."
    assert getattr(out.choices[0].message, "reasoning_content", None) is None


def test_reasoning_then_a_tool_call(qwen3):
    reply = '<think>\nNeed the tool.\n</think>\n\n<tool_call>\n{"name": "search", "arguments": {"query": "é"}}\n</tool_call>'
    out = ask(qwen3, reply, tools=TOOLS)
    message = out.choices[0].message
    assert out.choices[0].finish_reason == "tool_calls" and message.reasoning_content == "Need the tool."
    assert json.loads(message.tool_calls[0].function.arguments) == {"query": "é"} and not message.content
    chunks = ask(qwen3, reply, tools=TOOLS, stream=True)
    assert streamed(chunks) == ("Need the tool.", "")
    assert [d.function.name for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])
            if d.function.name] == ["search"]


def test_r1_opens_the_block_in_the_prompt_and_a_cut_off_thought_is_all_reasoning(tmp_path_factory):
    r1 = serving_with(tmp_path_factory, DEEPSEEK_R1)
    reply = "Hmm, weather.\n</think>\n\nSunny."
    message = ask(r1, reply).choices[0].message
    assert (message.reasoning_content, message.content) == ("Hmm, weather.", "Sunny.")
    assert streamed(ask(r1, reply, stream=True)) == ("Hmm, weather.", "Sunny.")
    cut = ask(r1, reply, max_tokens=3)
    assert cut.choices[0].finish_reason == "length" and cut.choices[0].message.content == ""
    assert reply.startswith(cut.choices[0].message.reasoning_content)


def test_gpt_oss_analysis_channel_is_reasoning_content(tmp_path_factory):
    oss = serving_with(tmp_path_factory, GPT_OSS)
    reply = HARMONY_REPLY
    message = ask(oss, reply).choices[0].message
    assert (message.reasoning_content, message.content) == ("User asks weather.", "Sunny.")
    assert streamed(ask(oss, reply, stream=True)) == ("User asks weather.", "Sunny.")
    call = HARMONY_CALL
    out = ask(oss, call, tools=TOOLS)
    assert out.choices[0].finish_reason == "tool_calls" and out.choices[0].message.reasoning_content == "Use search."
    assert out.choices[0].message.tool_calls[0].function.name == "search"


def test_reasoning_parser_none_turns_the_split_off(tmp_path_factory):
    plain = serving_with(tmp_path_factory, QWEN3, reasoning_parser="none")
    reply = "<think>\nx\n</think>\n\ny"
    assert ask(plain, reply).choices[0].message.content == reply


def test_reasoning_effort_reaches_the_template_as_transformers_gives_it(tmp_path_factory, qwen3):
    """gpt-oss's template reads `reasoning_effort` (default medium): the request field renders the
    same ids as transformers' apply_chat_template(reasoning_effort=...). A template without one → 400."""
    import openai
    from transformers import AutoTokenizer

    from deployments.api.schema import ChatCompletionRequest
    from tests.deployments.helpers import MESSAGES

    oss = serving_with(tmp_path_factory, GPT_OSS)
    reference = AutoTokenizer.from_pretrained(oss.cfg.model)
    for effort in (None, "low", "high"):
        want = reference.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False,
                                             **({"reasoning_effort": effort} if effort else {}))
        got = oss.render_chat(ChatCompletionRequest(messages=MESSAGES, reasoning_effort=effort))
        assert got == list(want), effort
        assert f"Reasoning: {effort or 'medium'}" in oss.text.decode(got)
    assert ask(oss, HARMONY_REPLY, reasoning_effort="high").choices[0].message.content == "Sunny."
    with pytest.raises(openai.BadRequestError) as e:  # the two ways of setting it disagree
        ask(oss, HARMONY_REPLY, reasoning_effort="high",
            extra_body={"chat_template_kwargs": {"reasoning_effort": "low"}})
    assert e.value.body["param"] == "reasoning_effort"
    with pytest.raises(openai.BadRequestError) as e:  # Qwen3's template has enable_thinking, no effort
        ask(qwen3, "<think>\nx\n</think>\n\ny", reasoning_effort="low")
    assert e.value.body["param"] == "reasoning_effort" and "no reasoning effort" in e.value.body["message"]
