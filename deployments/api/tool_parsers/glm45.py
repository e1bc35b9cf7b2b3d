"""GLM-4.5: `<tool_call>name\n<arg_key>k</arg_key>\n<arg_value>v</arg_value>\n</tool_call>`.
Values are bare text: strings as written, anything else as JSON (the template's `tojson`)."""
from __future__ import annotations

from deployments.api.markers import blocks
from cluster.engine.grammar import GrammarSpec
from deployments.api.tool_parsers.base import ToolCall, arguments_text, bare_calls, typed_value

START = "<tool_call>"
TOKENS = (START, "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>")


def calls(section: str, schemas: dict) -> list[ToolCall] | None:
    out = []
    for block in blocks(section, START, "</tool_call>") or ():
        name, sep, body = block.partition("<")
        pairs = blocks(sep + body, "<arg_key>", "</arg_value>")
        if not name.strip() or "\n" in name.strip() or pairs is None:
            return None
        arguments = {}
        for pair in pairs:
            key, closed, value = pair.partition("</arg_key>")
            value = value.lstrip()
            if not closed or not value.startswith("<arg_value>"):
                return None
            arguments[key.strip()] = typed_value(value[len("<arg_value>"):], key.strip(),
                                                 schemas.get(name.strip()))
        out.append(ToolCall(name.strip(), arguments_text(arguments)))
    return out or None


def forced(schemas: dict[str, dict]) -> GrammarSpec:
    return bare_calls("glm45", schemas, ("<tool_call>{name}\n", "</tool_call>"),
                      ("<arg_key>{key}</arg_key>\n<arg_value>", "</arg_value>\n"))
