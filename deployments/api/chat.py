"""Chat prompts rendered exactly as Hugging Face transformers renders them.

    templates = ChatTemplates.from_checkpoint("models/demo")          # once, at startup
    prompt = templates.render(messages, tools=tools)                   # per request, in a worker thread
    ids = tokenizer.encode(prompt, add_special_tokens=False)           # the template wrote bos_token already

- Templates and special tokens are found where transformers finds them (see chat_files.py); a
  checkpoint without a template gets DEFAULT_TEMPLATE.
- Templates run in jinja2's sandbox set up as transformers sets it up (see chat_jinja.py).
- OpenAI messages are turned into what templates expect, as vLLM does (see chat_messages.py).
- Every failure is a ChatTemplateError, meant for HTTP 400 / gRPC INVALID_ARGUMENT.

Pure: no Ray, no web framework. Rendering holds no lock and touches no shared mutable state, so
any number of threads may render at once; compiled templates are cached by source.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deployments.api.chat_files import find_templates, read_json, special_tokens
from deployments.api.chat_jinja import (ChatTemplateError, compile_template, loops_over_content, reads_variables,
                                        run_template)
from deployments.api.chat_messages import cut_at_marker, mark_final_message, normalise_messages, plain_data

__all__ = ["ChatTemplateError", "ChatTemplates", "DEFAULT_TEMPLATE"]

# For checkpoints without a template. vLLM refuses such models; we serve them with this plain format,
# which still shows the model every field the request gave (tools, documents, tool calls).
DEFAULT_TEMPLATE = (
    "{% if tools %}<|tools|>\n{{ tools | tojson }}\n{% endif %}"
    "{% if documents %}<|documents|>\n{{ documents | tojson }}\n{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}"
    "{{ m.tool_calls | tojson if m.tool_calls else '' }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Variables render() sets itself; template_kwargs may not replace them.
RESERVED_VARIABLES = frozenset({"messages", "tools", "documents", "add_generation_prompt"})


@dataclass(frozen=True)
class ChatTemplates:
    """A checkpoint's chat templates by name ("default", "tool_use", ...) and its special tokens."""

    templates: dict[str, str]
    special_tokens: dict[str, str] = field(default_factory=dict)
    origin: str = "built-in default"  # the file the templates came from, for logs

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> ChatTemplates:
        """Templates and special tokens of the checkpoint directory `path` (see chat_files.py)."""
        root = Path(path)
        config = read_json(root / "tokenizer_config.json")
        templates, origin = find_templates(root, config)
        if not templates:
            templates, origin = {"default": DEFAULT_TEMPLATE}, "built-in default"
        return cls(templates=templates, special_tokens=special_tokens(root, config), origin=origin)

    @property
    def names(self) -> list[str]:
        return sorted(self.templates)

    def template_for(self, template_name: str | None = None, *, with_tools: bool = False) -> str:
        """The source of the template a request gets, chosen as transformers' `get_chat_template` does:
        the one asked for, else "tool_use" when tools are given and it exists, else "default"."""
        if template_name is not None:
            if template_name not in self.templates:
                raise ChatTemplateError(f"unknown chat template {template_name!r}; this model has {self.names}")
            return self.templates[template_name]
        if with_tools and "tool_use" in self.templates:
            return self.templates["tool_use"]
        if "default" not in self.templates:
            raise ChatTemplateError(f"this model has no default chat template: name one of {self.names}")
        return self.templates["default"]

    def reads(self, variable: str, *, with_tools: bool = False) -> bool:
        """Whether the template a request gets reads `variable` (a request field given to it as one)."""
        return variable in reads_variables(self.template_for(with_tools=with_tools))

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        template_kwargs: dict[str, Any] | None = None,
        template_name: str | None = None,
    ) -> str:
        """The prompt text for `messages` (OpenAI shape), as `apply_chat_template(..., tokenize=False)`.

        tools / documents: lists of JSON objects, given to the template as `tools` / `documents`.
        add_generation_prompt: end with the header of a new assistant turn.
        continue_final_message: end inside the last message instead (prefill); excludes add_generation_prompt.
        template_kwargs: extra template variables (e.g. {"enable_thinking": False}); they override
            special tokens of the same name, as in transformers.
        template_name: a named template of the checkpoint instead of the default choice.
        Raises ChatTemplateError for any failure.
        """
        source = self.template_for(template_name, with_tools=tools is not None)
        template = compile_template(source)
        if continue_final_message and add_generation_prompt:
            raise ChatTemplateError("continue_final_message and add_generation_prompt cannot both be set")
        chat = normalise_messages(messages, content_as_parts=loops_over_content(source))
        final_text = mark_final_message(chat, source) if continue_final_message else None
        variables = {**self.special_tokens, **_extra_variables(template_kwargs),
                     "messages": chat, "tools": _objects(tools, "tools"), "documents": _objects(documents, "documents"),
                     "add_generation_prompt": bool(add_generation_prompt)}
        rendered = run_template(template, variables)
        return rendered if final_text is None else cut_at_marker(rendered, final_text)


def _objects(items: Any, name: str) -> list[dict[str, Any]] | None:
    """tools / documents: None, or a list of JSON objects (transformers refuses anything else)."""
    if items is None:
        return None
    items = plain_data(items, name)
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise ChatTemplateError(f"{name} must be a list of objects")
    return items


def _extra_variables(template_kwargs: Any) -> dict[str, Any]:
    if template_kwargs is None:
        return {}
    variables = plain_data(template_kwargs, "chat_template_kwargs")
    if not isinstance(variables, dict):
        raise ChatTemplateError("chat_template_kwargs must be an object")
    if clash := sorted(RESERVED_VARIABLES & variables.keys()):
        raise ChatTemplateError(f"chat_template_kwargs may not set {clash}: use the request fields instead")
    return variables
