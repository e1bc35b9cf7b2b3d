"""Tool calls read out of a model's reply, one module per format as each family's chat template renders
calls (so a model answers in the format it was trained on). The names are vLLM's `--tool-call-parser`
names; `detect` picks one from the checkpoint's template, `tool_call_parser` (YAML / --tool-call-parser)
overrides it.

    parsed = parse("Sure.<tool_call>\\n{\\"name\\": \\"f\\", \\"arguments\\": {}}\\n</tool_call>", "hermes", {})
    parsed.content == "Sure." and parsed.calls[0].name == "f"

Pure functions over text: no state, no I/O.
"""
from __future__ import annotations

from types import ModuleType

from deployments.api.tool_parsers import (deepseek_v3, deepseek_v31, glm45, hermes, kimi_k2, mistral, openai,
                                          qwen3_coder)
from cluster.engine.grammar import GrammarSpec
from deployments.api.tool_parsers.base import Parsed, ToolCall

__all__ = ["PARSERS", "Parsed", "ToolCall", "detect", "forced_call", "marker_tokens", "parse", "start_marker"]

PARSERS: dict[str, ModuleType] = {
    "hermes": hermes, "qwen3_coder": qwen3_coder, "deepseek_v3": deepseek_v3, "deepseek_v31": deepseek_v31,
    "kimi_k2": kimi_k2, "glm45": glm45, "mistral": mistral, "openai": openai,
}

# What in a chat template tells its format, most specific first (GLM-4.5 and Qwen3-Coder also say <tool_call>).
_SIGNS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("<|channel|>",), "openai"),
    (("<|tool_calls_section_begin|>",), "kimi_k2"),
    (("<arg_key>",), "glm45"),
    (("<function=", "<parameter="), "qwen3_coder"),
    (("<｜tool▁calls▁begin｜>", "```json"), "deepseek_v3"),
    (("<｜tool▁calls▁begin｜>",), "deepseek_v31"),
    (("[TOOL_CALLS]",), "mistral"),
    (("<tool_call>",), "hermes"),
)


def detect(template: str) -> str | None:
    """The parser for a checkpoint whose chat template is `template`; None when it renders no tool calls
    in a format we know."""
    return next((name for signs, name in _SIGNS if all(s in template for s in signs)), None)


def forced_call(parser: str, schemas: dict[str, dict], names: list[str]) -> GrammarSpec:
    """What a reply forced to call one of `names` (tool_choice required / named) must follow: one call in
    the format's own text with arguments that follow the tool's parameter schema. ValueError naming what
    the format cannot express."""
    return PARSERS[parser].forced({name: schemas.get(name) or {} for name in names})


def start_marker(parser: str) -> str:
    return PARSERS[parser].START


def marker_tokens(parser: str) -> tuple[str, ...]:
    return PARSERS[parser].TOKENS


def parse(text: str, parser: str, schemas: dict[str, dict]) -> Parsed:
    """Content and tool calls of a finished reply. `schemas`: each tool's parameters schema by name (the
    bare-text formats read a value as a string where the schema says so). A section of calls that is
    incomplete or malformed (cut off by max_tokens) leaves the whole reply as content."""
    module = PARSERS[parser]
    if hasattr(module, "parse"):
        return module.parse(text, schemas)
    at = text.find(module.START)
    if at < 0:
        return Parsed(text)
    calls = module.calls(text[at:], schemas)
    if calls is None:
        return Parsed(text)
    return Parsed(text[:at].rstrip(), tuple(calls))
