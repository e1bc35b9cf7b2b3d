"""DeepSeek-V3 / R1: `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>name\n```json\n{...}\n```
<｜tool▁call▁end｜>` per call, `<｜tool▁calls▁end｜>` after the last."""
from __future__ import annotations

import re

from deployments.api.tool_parsers.base import ToolCall, arguments_text, json_object, only_blocks

START = "<｜tool▁calls▁begin｜>"
MARKERS = (START, "<｜tool▁calls▁end｜>")
_CALL = re.compile(r"<｜tool▁call▁begin｜>(\w*)<｜tool▁sep｜>([^\n]+)\n```json\n(.*?)\n```\s*<｜tool▁call▁end｜>",
                   re.DOTALL)


def calls(section: str, schemas: dict) -> list[ToolCall] | None:
    found = list(_CALL.finditer(section))
    if not only_blocks(section, [m.span() for m in found], MARKERS):
        return None
    arguments = [json_object(m.group(3)) for m in found]
    if any(a is None for a in arguments):
        return None
    return [ToolCall(m.group(2).strip(), arguments_text(a)) for m, a in zip(found, arguments)]
