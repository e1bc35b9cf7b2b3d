"""Qwen3-Coder: `<tool_call>\n<function=name>\n<parameter=key>\nvalue\n</parameter>\n</function>\n</tool_call>`.
Values are bare text: strings as written, anything else as JSON (the template's `tojson`)."""
from __future__ import annotations

from deployments.api.markers import blocks
from cluster.engine.grammar import GrammarSpec
from deployments.api.tool_parsers.base import ToolCall, arguments_text, bare_calls, typed_value

START = "<tool_call>"
TOKENS = (START, "</tool_call>")


def calls(section: str, schemas: dict) -> list[ToolCall] | None:
    out = []
    for block in blocks(section, START, "</tool_call>") or ():
        function = blocks(block, "<function=", "</function>") or []
        name, closed, body = function[0].partition(">") if len(function) == 1 else ("", "", "")
        params = blocks(body, "<parameter=", "</parameter>")
        if not closed or not name.strip() or "\n" in name or params is None:
            return None
        arguments = {}
        for param in params:
            key, closed, value = param.partition(">")
            if not closed or not key.strip() or "\n" in key:
                return None
            value = value[1:] if value.startswith("\n") else value
            value = value[:-1] if value.endswith("\n") else value
            arguments[key.strip()] = typed_value(value, key.strip(), schemas.get(name.strip()))
        out.append(ToolCall(name.strip(), arguments_text(arguments)))
    return out or None


def forced(schemas: dict[str, dict]) -> GrammarSpec:
    return bare_calls("qwen3_coder", schemas, ("<tool_call>\n<function={name}>\n", "</function>\n</tool_call>"),
                      ("<parameter={key}>\n", "\n</parameter>\n"))
