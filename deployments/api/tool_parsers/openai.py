"""gpt-oss (OpenAI harmony): the reply is a run of messages `<|channel|>name[ to=recipient]
[<|constrain|>json]<|message|>body` ended by `<|end|>`, `<|call|>` or `<|return|>`, each after the first
opened by `<|start|>assistant`. `final` is the answer, `analysis` the reasoning, and `commentary` with
`to=functions.name` a tool call whose body is the JSON arguments.

Read from text here: openai-harmony's own parser needs its tokenizer files, fetched from the network on
first use, which a served cluster may not reach."""
from __future__ import annotations

import re

from cluster.engine.grammar import GrammarSpec
from deployments.api.tool_parsers.base import Parsed, ToolCall, arguments_text, each_call, json_object

START = "<|channel|>"
TOKENS = ("<|start|>", START, "<|constrain|>", "<|message|>", "<|end|>", "<|call|>", "<|return|>")
_MESSAGE = re.compile(r"(?:<\|start\|>assistant)?(?P<header>(?:(?!<\|message\|>).)*?)<\|message\|>"
                      r"(?P<body>.*?)(?P<end><\|end\|>|<\|call\|>|<\|return\|>|$)", re.DOTALL)
_CHANNEL = re.compile(r"<\|channel\|>(\w+)")
_RECIPIENT = re.compile(r"to=functions\.([^\s<]+)")


def parse(text: str, schemas: dict) -> Parsed:
    if "<|message|>" not in text:
        return Parsed(text)
    content, reasoning, calls = [], [], []
    for m in _MESSAGE.finditer(text):
        channel = _CHANNEL.search(m.group("header"))
        recipient = _RECIPIENT.search(m.group("header"))
        body = m.group("body")
        if recipient:
            arguments = json_object(body) if m.group("end") == "<|call|>" else None
            if arguments is None:  # cut off or malformed: the model's text, not a broken call
                content.append(body)
            else:
                calls.append(ToolCall(recipient.group(1), arguments_text(arguments)))
        elif channel and channel.group(1) == "analysis":
            reasoning.append(body)
        else:
            content.append(body)
    return Parsed("".join(content), tuple(calls), "".join(reasoning) if reasoning else None)


def forced(schemas: dict[str, dict]) -> GrammarSpec:
    """The call right away on the commentary channel; `<|call|>` ends it (a stop token where the checkpoint
    says so: the engine stops on it, and the parser's view keeps it)."""
    return each_call(schemas, lambda name, schema: GrammarSpec.wrapped(
        schema, f"{START}commentary to=functions.{name} <|constrain|>json<|message|>", "<|call|>"))
