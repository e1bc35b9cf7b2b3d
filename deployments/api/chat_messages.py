"""OpenAI chat inputs turned into what chat templates expect (the conversation vLLM hands to
`apply_chat_template`), then prepared as transformers prepares it before rendering.

Messages, per field:

| OpenAI input | what the template sees |
|---|---|
| `content: "text"` | `"text"` |
| `content: [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]` | `"a\\nb"` (parts joined by a newline, vLLM's "string" format) |
| the same, for a template that loops over `message.content` | `[{"type": "text", "text": "a"}, ...]`; a plain string becomes one such part (vLLM's "openai" format) |
| `content: null` or absent (an assistant turn with `tool_calls`) | `""` (or `[]` for a looping template), as vLLM passes it |
| a `refusal` part | its text, like a text part |
| an `image_url`, `input_audio`, ... part | ChatTemplateError naming the part: this server takes text only |
| `tool_calls[i].function.arguments: "{\\"x\\": 1}"` | `{"x": 1}`: templates read arguments as a mapping (vLLM parses them too) |
| `tool` message: `tool_call_id`, `name`, `content` as parts | kept; parts joined into a string even for looping templates (vLLM does so) |
| `reasoning` / `reasoning_content` / `thinking` | all three names, as transformers 5.23 aliases them |
| any other field | passed through; fields whose value is null are dropped (transformers) |

Everything the template sees is rebuilt from plain JSON values (str, int, float, bool, None, dict,
list): rich objects have methods the sandbox does not know to be dangerous.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from deployments.api.chat_jinja import ChatTemplateError

MAX_DEPTH = 64  # deeper inputs are not chat messages; recursion stays far from Python's limit
TEXT_FIELDS = {"text": "text", "refusal": "refusal"}  # content part type -> the field holding its text
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # transformers' order of preference
# transformers appends this to the message being continued, renders, and cuts the prompt where it lands
CONTINUE_MARKER = "CONTINUE_FINAL_MESSAGE_TAG "


def plain_data(value: Any, where: str, depth: int = 0) -> Any:
    """`value` rebuilt from JSON types only (str subclasses such as str-enums become plain str)."""
    if depth > MAX_DEPTH:
        raise ChatTemplateError(f"{where} is nested too deeply")
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (str, int, float):
        if isinstance(value, base):
            return _as_base(value, base)
    if isinstance(value, Mapping):
        return {_key(k, where): plain_data(v, f"{where}.{k}", depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    if callable(getattr(value, "model_dump", None)):  # a pydantic model from the request schema
        return plain_data(value.model_dump(), where, depth + 1)
    raise ChatTemplateError(f"{where}: a value of type {type(value).__name__} cannot be passed to a chat template")


def _as_base(value: Any, base: type) -> Any:
    # str(enum_member) would give "Role.user"; the base type's own conversion gives the value
    return {str: str.__str__, int: int.__int__, float: float.__float__}[base](value)


def _key(key: Any, where: str) -> str:
    if not isinstance(key, str):
        raise ChatTemplateError(f"{where}: keys must be strings")
    return str.__str__(key)


def normalise_messages(messages: Any, *, content_as_parts: bool) -> list[dict[str, Any]]:
    """The conversation as the template sees it (table above). Raises ChatTemplateError naming the field."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatTemplateError("messages must be a non-empty list")
    return [_message(m, f"messages[{i}]", content_as_parts) for i, m in enumerate(messages)]


def _message(raw: Any, where: str, content_as_parts: bool) -> dict[str, Any]:
    message = plain_data(raw, where)
    if not isinstance(message, dict):
        raise ChatTemplateError(f"{where} must be an object")
    if not isinstance(message.get("role"), str):
        raise ChatTemplateError(f"{where}.role must be a string")
    content = message.get("content")
    message = {k: v for k, v in message.items() if v is not None}
    as_parts = content_as_parts and message["role"] != "tool"
    message["content"] = _content(content, f"{where}.content", as_parts)
    if "tool_calls" in message:
        message["tool_calls"] = _tool_calls(message["tool_calls"], f"{where}.tool_calls")
        if not message["tool_calls"]:
            del message["tool_calls"]  # an empty list would send templates down their tool-call path
    return _alias_reasoning(message)


def _content(content: Any, where: str, as_parts: bool) -> str | list[dict[str, str]]:
    if content is None:
        texts = []
    elif isinstance(content, str):
        texts = [content]
    elif isinstance(content, list):
        texts = [_part_text(part, f"{where}[{j}]") for j, part in enumerate(content)]
    else:
        raise ChatTemplateError(f"{where} must be a string, a list of content parts or null")
    return [{"type": "text", "text": t} for t in texts] if as_parts else "\n".join(texts)


def _part_text(part: Any, where: str) -> str:
    if isinstance(part, str):
        return part
    kind = part.get("type") if isinstance(part, dict) else None
    if kind not in TEXT_FIELDS:
        raise ChatTemplateError(f"{where}: content part type {kind!r} is not supported (this model takes text only)")
    text = part.get(TEXT_FIELDS[kind])
    if not isinstance(text, str):
        raise ChatTemplateError(f"{where}.{TEXT_FIELDS[kind]} must be a string")
    return text


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise ChatTemplateError(f"{where} must be a list")
    parsed = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ChatTemplateError(f"{where}[{j}].function must be an object with a name")
        arguments = _arguments(function.get("arguments"), f"{where}[{j}].function.arguments")
        parsed.append({**call, "function": {**function, "arguments": arguments}})
    return parsed


def _arguments(arguments: Any, where: str) -> dict[str, Any]:
    """OpenAI sends arguments as a JSON string; templates (`arguments | items`, `arguments | tojson`)
    expect the object. Unlike vLLM, which silently renders `{}` for invalid JSON, we refuse it."""
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        return {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):
            raise ChatTemplateError(f"{where} is not valid JSON") from None
    if not isinstance(arguments, dict):
        raise ChatTemplateError(f"{where} must be a JSON object")
    return plain_data(arguments, where)


def _alias_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    """transformers 5.23 offers a message's reasoning under `reasoning_content` (what most templates
    read) and `thinking` (gpt-oss templates), whichever name the caller used."""
    reasoning = next((message[f] for f in REASONING_FIELDS if message.get(f) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def mark_final_message(messages: list[dict[str, Any]], source: str) -> str:
    """For `continue_final_message`: append CONTINUE_MARKER to the last message's text (in place) and
    return that text, as transformers does; `cut_at_marker` then ends the prompt there."""
    if "content" not in source:
        raise ChatTemplateError("continue_final_message is set but this chat template does not render message content")
    content = messages[-1]["content"]
    if isinstance(content, str):
        messages[-1]["content"] = content + CONTINUE_MARKER
        return content
    if not content:
        raise ChatTemplateError("continue_final_message is set but the final message has no text to continue")
    content[-1]["text"] += CONTINUE_MARKER
    return content[-1]["text"][: -len(CONTINUE_MARKER)]


def cut_at_marker(rendered: str, final_text: str) -> str:
    """The prompt up to the end of the continued message: no end-of-turn tokens after it."""
    marker = CONTINUE_MARKER.strip()
    if final_text.strip() not in rendered or marker not in rendered:
        raise ChatTemplateError("continue_final_message is set but the chat template drops or changes the final "
                                "message, so it cannot be continued")
    at = rendered.rindex(marker)
    if rendered[at:at + len(CONTINUE_MARKER)] == CONTINUE_MARKER:
        return rendered[:at]
    return rendered[:at].rstrip()  # the template trimmed the marker's trailing space: trim the message's too
