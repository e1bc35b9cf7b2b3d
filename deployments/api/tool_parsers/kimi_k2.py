"""Kimi-K2: `<|tool_calls_section_begin|><|tool_call_begin|>functions.name:0<|tool_call_argument_begin|>{...}
<|tool_call_end|>...<|tool_calls_section_end|>`; the model writes the call's id (`functions.name:index`)."""
from __future__ import annotations

import re

from deployments.api.tool_parsers.base import ToolCall, arguments_text, json_object, only_blocks

START = "<|tool_calls_section_begin|>"
MARKERS = (START, "<|tool_calls_section_end|>")
_CALL = re.compile(r"<\|tool_call_begin\|>\s*([^<]+?)\s*<\|tool_call_argument_begin\|>(.*?)<\|tool_call_end\|>",
                   re.DOTALL)
_ID = re.compile(r"(?:functions\.)?(.+?)(?::\d+)?$")


def calls(section: str, schemas: dict) -> list[ToolCall] | None:
    found = list(_CALL.finditer(section))
    if not only_blocks(section, [m.span() for m in found], MARKERS):
        return None
    arguments = [json_object(m.group(2)) for m in found]
    if any(a is None for a in arguments):
        return None
    return [ToolCall(_ID.match(m.group(1)).group(1), arguments_text(a), id=m.group(1))
            for m, a in zip(found, arguments)]
