"""What every tool-call parser returns, and the helpers they share.

A parser is a module with `forced(schemas) -> GrammarSpec` (a reply that is one call, in its format,
to one of the tools in `schemas` with arguments that follow the tool's parameter schema: what
tool_choice required / named constrain decoding to; ValueError naming what the format cannot
express), `START` (the text where a message's tool calls begin: what comes before it is
content), `TOKENS` (every marker text the format reads: a tokenizer may hold them as special tokens, which
the parser's view keeps) and `calls(section, schemas) -> list[ToolCall] | None` over the text from `START`
on; most formats are blocks between fixed markers, read with `markers.blocks`. `None` means the section
is not a complete, well-formed run of calls (e.g. cut off by max_tokens): the whole message is then
returned as content, never a broken call (vLLM does the same).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

from cluster.engine.grammar import GrammarSpec


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (OpenAI's `function.arguments`)
    id: str | None = None  # the model's own id where its format carries one (Kimi-K2: functions.name:0)


@dataclass(frozen=True)
class Parsed:
    content: str
    calls: tuple[ToolCall, ...] = ()
    reasoning: str | None = None  # formats that carry it apart (gpt-oss's analysis channel)


def json_object(text: str) -> dict[str, Any] | None:
    """`text` as a JSON object, or None when it is not one."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def arguments_text(arguments: dict[str, Any]) -> str:
    return json.dumps(arguments, ensure_ascii=False)


def typed_value(raw: str, name: str, schema: dict[str, Any] | None) -> Any:
    """A parameter written as bare text (Qwen3-Coder, GLM-4.5): strings stay text, anything else is read as
    JSON, as those templates render it (`value if string else value | tojson`). The tool's schema decides
    where it says the type; without one, text that parses as JSON is taken as JSON."""
    kind = ((schema or {}).get("properties", {}).get(name) or {}).get("type")
    if kind == "string":
        return raw
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return raw


def json_calls(found: list[tuple[str, str, str | None]]) -> list[ToolCall] | None:
    """Calls from (name, arguments as JSON text, the model's id or None) per call; None when there are
    none or any arguments are not a JSON object."""
    arguments = [json_object(raw) for _, raw, _ in found]
    if not found or any(a is None for a in arguments):
        return None
    return [ToolCall(name.strip(), arguments_text(a), id=call_id)
            for (name, _, call_id), a in zip(found, arguments)]


def call_object(name: str, schema: dict | None) -> dict:
    """The JSON schema of `{"name": name, "arguments": {...}}` (formats whose call is one JSON object)."""
    return {"type": "object", "properties": {"name": {"const": name}, "arguments": schema or {"type": "object"}},
            "required": ["name", "arguments"], "additionalProperties": False}


def each_call(schemas: dict[str, dict], call: Callable[[str, dict], GrammarSpec]) -> GrammarSpec:
    """A call to any one of the tools, each in the format's text around its JSON arguments."""
    return GrammarSpec.any_of(*(call(name, schema or {"type": "object"}) for name, schema in schemas.items()))


def bare_calls(parser: str, schemas: dict[str, dict], call: tuple[str, str], pair: tuple[str, str]) -> GrammarSpec:
    """A call in a bare-text format (Qwen3-Coder, GLM-4.5): `call` is the text before the arguments (with
    `{name}`) and after them, `pair` the text before each value (with `{key}`) and after it."""
    def one(name: str, schema: dict) -> GrammarSpec:
        return GrammarSpec.sequence(GrammarSpec.literal(call[0].format(name=name)),
                                    _bare_arguments(parser, schema, pair), GrammarSpec.literal(call[1]))
    return each_call(schemas, one)


def _bare_arguments(parser: str, schema: dict, pair: tuple[str, str]) -> GrammarSpec:
    """Each property in the schema's order, the required ones always, the others optionally. Strings are
    bare text (an enum as its words, a pattern as its regex), anything else JSON of the property's
    schema, as `typed_value` reads them back."""
    if schema.get("type", "object") != "object" or "$ref" in json.dumps(schema):
        raise ValueError(f"{parser} writes arguments as bare key/value pairs: only a flat object schema "
                         "without $ref can be forced")
    required = set(schema.get("required") or ())
    parts = []
    for key, prop in (schema.get("properties") or {}).items():
        value = _bare_value(parser, key, prop if isinstance(prop, dict) else {})
        piece = GrammarSpec.sequence(GrammarSpec.literal(pair[0].format(key=key)), value, GrammarSpec.literal(pair[1]))
        parts.append(piece if key in required else GrammarSpec.any_of(piece, GrammarSpec.literal("")))
    return GrammarSpec.sequence(*parts) if parts else GrammarSpec.literal("")


def _bare_value(parser: str, key: str, prop: dict) -> GrammarSpec:
    if prop.get("type") != "string":
        return GrammarSpec.json_schema(prop)
    if "enum" in prop or "const" in prop:
        return GrammarSpec.any_of(*(GrammarSpec.literal(str(v)) for v in prop.get("enum", [prop.get("const")])))
    if "pattern" in prop:
        return GrammarSpec.regex(prop["pattern"].removeprefix("^").removesuffix("$"))
    limits = sorted(set(prop) & {"minLength", "maxLength", "format"})
    if limits:
        raise ValueError(f"{parser} writes strings bare: parameter {key!r} with {', '.join(limits)} cannot be "
                         "forced (use a pattern)")
    return GrammarSpec.text()
