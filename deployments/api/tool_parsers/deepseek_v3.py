"""DeepSeek-V3 / R1: `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>name\n```json\n{...}\n```
<｜tool▁call▁end｜>` per call, `<｜tool▁calls▁end｜>` after the last."""
from __future__ import annotations

import re

from deployments.api.markers import blocks
from cluster.engine.grammar import GrammarSpec
from deployments.api.tool_parsers.base import ToolCall, each_call, json_calls

START = "<｜tool▁calls▁begin｜>"
MARKERS = (START, "<｜tool▁calls▁end｜>")
TOKENS = (*MARKERS, "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>")
_CALL = re.compile(r"\w*<｜tool▁sep｜>([^\n]+)\n```json\n(.*?)\n```\s*", re.DOTALL)


def calls(section: str, schemas: dict) -> list[ToolCall] | None:
    inner = blocks(section, "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", MARKERS) or []
    found = [_CALL.fullmatch(call) for call in inner]
    if not all(found):
        return None
    return json_calls([(m.group(1), m.group(2), None) for m in found])


def forced(schemas: dict[str, dict]) -> GrammarSpec:
    return each_call(schemas, lambda name, schema: GrammarSpec.wrapped(
        schema, f"{START}<｜tool▁call▁begin｜>function<｜tool▁sep｜>{name}\n```json\n",
        "\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>"))
