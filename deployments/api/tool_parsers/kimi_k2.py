"""Kimi-K2: `<|tool_calls_section_begin|><|tool_call_begin|>functions.name:0<|tool_call_argument_begin|>{...}
<|tool_call_end|>...<|tool_calls_section_end|>`; the model writes the call's id (`functions.name:index`)."""
from __future__ import annotations

import re

from deployments.api.markers import blocks
from cluster.engine.grammar import GrammarSpec
from deployments.api.tool_parsers.base import ToolCall, each_call, json_calls

START = "<|tool_calls_section_begin|>"
MARKERS = (START, "<|tool_calls_section_end|>")
TOKENS = (*MARKERS, "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>")
_ID = re.compile(r"(?:functions\.)?(.+?)(?::\d+)?")


def calls(section: str, schemas: dict) -> list[ToolCall] | None:
    inner = blocks(section, "<|tool_call_begin|>", "<|tool_call_end|>", MARKERS) or []
    found = [call.partition("<|tool_call_argument_begin|>") for call in inner]
    if not all(sep and call_id.strip() and "<" not in call_id for call_id, sep, _ in found):
        return None
    return json_calls([(_ID.fullmatch(call_id.strip()).group(1), arguments, call_id.strip())
                       for call_id, _, arguments in found])


def forced(schemas: dict[str, dict]) -> GrammarSpec:
    return each_call(schemas, lambda name, schema: GrammarSpec.wrapped(
        schema, f"{START}<|tool_call_begin|>functions.{name}:0<|tool_call_argument_begin|>",
        "<|tool_call_end|><|tool_calls_section_end|>"))
