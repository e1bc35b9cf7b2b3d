"""DeepSeek-V3.1: `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>name<｜tool▁sep｜>{...}<｜tool▁call▁end｜>...
<｜tool▁calls▁end｜>`."""
from __future__ import annotations

import re

from deployments.api.tool_parsers.base import ToolCall, arguments_text, json_object, only_blocks

START = "<｜tool▁calls▁begin｜>"
MARKERS = (START, "<｜tool▁calls▁end｜>")
_CALL = re.compile(r"<｜tool▁call▁begin｜>(.*?)<｜tool▁sep｜>(.*?)<｜tool▁call▁end｜>", re.DOTALL)


def calls(section: str, schemas: dict) -> list[ToolCall] | None:
    found = list(_CALL.finditer(section))
    if not only_blocks(section, [m.span() for m in found], MARKERS):
        return None
    arguments = [json_object(m.group(2)) for m in found]
    if any(a is None for a in arguments):
        return None
    return [ToolCall(m.group(1).strip(), arguments_text(a)) for m, a in zip(found, arguments)]
