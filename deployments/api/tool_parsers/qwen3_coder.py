"""Qwen3-Coder: `<tool_call>\n<function=name>\n<parameter=key>\nvalue\n</parameter>\n</function>\n</tool_call>`.
Values are bare text: strings as written, anything else as JSON (the template's `tojson`)."""
from __future__ import annotations

import re

from deployments.api.tool_parsers.base import ToolCall, arguments_text, only_blocks, typed_value

START = "<tool_call>"
_BLOCK = re.compile(r"<tool_call>\s*<function=([^>\n]+)>(.*?)</function>\s*</tool_call>", re.DOTALL)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.DOTALL)


def calls(section: str, schemas: dict) -> list[ToolCall] | None:
    blocks = list(_BLOCK.finditer(section))
    if not only_blocks(section, [m.span() for m in blocks]):
        return None
    out = []
    for m in blocks:
        name = m.group(1).strip()
        params = list(_PARAMETER.finditer(m.group(2)))
        if not only_blocks(m.group(2), [p.span() for p in params]) and m.group(2).strip():
            return None
        arguments = {p.group(1).strip(): typed_value(p.group(2), p.group(1).strip(), schemas.get(name))
                     for p in params}
        out.append(ToolCall(name, arguments_text(arguments)))
    return out
