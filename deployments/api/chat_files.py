"""Where a checkpoint keeps its chat templates and special tokens, read as transformers 5.23 reads them.

Templates, first source found wins (transformers' `PreTrainedTokenizerBase.from_pretrained`):
1. `chat_template.jinja` (named "default") and `additional_chat_templates/<name>.jinja`: these
   files replace whatever tokenizer_config.json says, even when they hold no "default".
2. tokenizer_config.json `chat_template`: a string ("default") or a list of `{"name", "template"}`.
3. chat_template.json `chat_template` (the legacy file that transformers' processors read; the
   tokenizer never does). Taken only when the tokenizer has no template, which is when vLLM would
   fall back to the processor's.
4. None: the caller supplies a plain default.

Special tokens (transformers' `tokenizer.special_tokens_map`, which `apply_chat_template` passes to
the template): every `*_token` entry of tokenizer_config.json given as a string or an AddedToken
dict (`{"content": ...}`), plus the named tokens of an `extra_special_tokens` dict. Checkpoints
without `added_tokens_decoder` (the legacy layout) also take special_tokens_map.json, whose entries
win, as in transformers.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deployments.api.chat_jinja import ChatTemplateError

TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_DIR = "additional_chat_templates"


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, {} when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ChatTemplateError(f"{path.name} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ChatTemplateError(f"{path.name} must hold a JSON object")
    return data


def find_templates(root: Path, tokenizer_config: dict[str, Any]) -> tuple[dict[str, str], str]:
    """(templates by name, the file they came from); ({}, "") when the checkpoint has none."""
    files = _template_files(root)
    if files:
        return files, f"{TEMPLATE_FILE} / {TEMPLATE_DIR}/"
    if tokenizer_config.get("chat_template") is not None:
        return _named(tokenizer_config["chat_template"], "tokenizer_config.json"), "tokenizer_config.json"
    legacy = read_json(root / "chat_template.json")
    if legacy.get("chat_template") is not None:
        return _named(legacy["chat_template"], "chat_template.json"), "chat_template.json"
    return {}, ""


def _template_files(root: Path) -> dict[str, str]:
    templates = {}
    if (root / TEMPLATE_FILE).is_file():
        templates["default"] = _read_text(root / TEMPLATE_FILE)
    for path in sorted((root / TEMPLATE_DIR).glob("*.jinja")):
        templates[path.name.removesuffix(".jinja")] = _read_text(path)
    return templates


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ChatTemplateError(f"{path.name} is not UTF-8 text") from None


def _named(value: Any, origin: str) -> dict[str, str]:
    """A template given as a string, a list of {"name", "template"}, or a {name: template} mapping."""
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(isinstance(t, dict) for t in value):
        value = {t.get("name"): t.get("template") for t in value}
    if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return dict(value)
    raise ChatTemplateError(f"{origin}: chat_template must be a string or a list of {{name, template}} objects")


def special_tokens(root: Path, tokenizer_config: dict[str, Any]) -> dict[str, str]:
    """Template variables such as bos_token / eos_token, as strings."""
    entries = dict(tokenizer_config)
    if "added_tokens_decoder" not in tokenizer_config:
        entries.update(read_json(root / "special_tokens_map.json"))
    tokens = {key: _token_text(value) for key, value in entries.items() if key.endswith("_token")}
    extra = entries.get("extra_special_tokens", entries.get("additional_special_tokens"))
    if isinstance(extra, dict):  # named model-specific tokens (a list holds unnamed ones: no variable)
        tokens.update({key: _token_text(value) for key, value in extra.items()})
    return {key: text for key, text in tokens.items() if text is not None}


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):  # an AddedToken
        return value["content"]
    return None
