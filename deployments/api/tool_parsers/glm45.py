"""GLM-4.5: `<tool_call>name\n<arg_key>k</arg_key>\n<arg_value>v</arg_value>\n</tool_call>`.
Values are bare text: strings as written, anything else as JSON (the template's `tojson`)."""
from __future__ import annotations

import re

from deployments.api.tool_parsers.base import ToolCall, arguments_text, only_blocks, typed_value

START = "<tool_call>"
_BLOCK = re.compile(r"<tool_call>([^\n<]+)\n?(.*?)</tool_call>", re.DOTALL)
_ARGUMENT = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)


def calls(section: str, schemas: dict) -> list[ToolCall] | None:
    blocks = list(_BLOCK.finditer(section))
    if not only_blocks(section, [m.span() for m in blocks]):
        return None
    out = []
    for m in blocks:
        name, body = m.group(1).strip(), m.group(2)
        pairs = list(_ARGUMENT.finditer(body))
        if body.strip() and not only_blocks(body, [p.span() for p in pairs]):
            return None
        arguments = {p.group(1).strip(): typed_value(p.group(2), p.group(1).strip(), schemas.get(name))
                     for p in pairs}
        out.append(ToolCall(name, arguments_text(arguments)))
    return out
