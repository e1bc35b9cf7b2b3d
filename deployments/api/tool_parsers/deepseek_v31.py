"""DeepSeek-V3.1: `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>name<｜tool▁sep｜>{...}<｜tool▁call▁end｜>...
<｜tool▁calls▁end｜>`."""
from __future__ import annotations

from deployments.api.markers import blocks
from cluster.engine.grammar import GrammarSpec
from deployments.api.tool_parsers.base import ToolCall, each_call, json_calls

START = "<｜tool▁calls▁begin｜>"
MARKERS = (START, "<｜tool▁calls▁end｜>")
TOKENS = (*MARKERS, "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>")


def calls(section: str, schemas: dict) -> list[ToolCall] | None:
    inner = blocks(section, "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", MARKERS) or []
    found = [call.partition("<｜tool▁sep｜>") for call in inner]
    if not all(sep for _, sep, _ in found):
        return None
    return json_calls([(name, arguments, None) for name, _, arguments in found])


def forced(schemas: dict[str, dict]) -> GrammarSpec:
    return each_call(schemas, lambda name, schema: GrammarSpec.wrapped(
        schema, f"{START}<｜tool▁call▁begin｜>{name}<｜tool▁sep｜>",
        "<｜tool▁call▁end｜><｜tool▁calls▁end｜>"))
