"""Hermes / Qwen2.5 / Qwen3: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one block per call."""
from __future__ import annotations

import re

from deployments.api.tool_parsers.base import ToolCall, arguments_text, json_object, only_blocks

START = "<tool_call>"
_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def calls(section: str, schemas: dict) -> list[ToolCall] | None:
    blocks = list(_BLOCK.finditer(section))
    if not only_blocks(section, [m.span() for m in blocks]):
        return None
    out = []
    for m in blocks:
        call = json_object(m.group(1))
        arguments = None if call is None else call.get("arguments", call.get("parameters", {}))
        if call is None or not isinstance(call.get("name"), str) or not isinstance(arguments, dict):
            return None
        out.append(ToolCall(call["name"], arguments_text(arguments)))
    return out
