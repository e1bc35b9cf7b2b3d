"""Chat prompts: the checkpoint's own chat template when it has one, else a plain default."""
from __future__ import annotations

import json
from pathlib import Path

DEFAULT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def load_template(model_path: str) -> str:
    """tokenizer_config.json's chat_template (or chat_template.jinja), else DEFAULT_TEMPLATE."""
    root = Path(model_path)
    config = root / "tokenizer_config.json"
    if config.exists():
        template = json.loads(config.read_text()).get("chat_template")
        if isinstance(template, str):
            return template
    jinja = root / "chat_template.jinja"
    return jinja.read_text() if jinja.exists() else DEFAULT_TEMPLATE


def render(template: str, messages: list[dict[str, str]]) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # sandboxed: templates come from checkpoints

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True)
