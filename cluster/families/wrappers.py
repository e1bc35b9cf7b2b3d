"""Multimodal checkpoints served as text models. Their config.json wraps the text model's config in
`text_config` (with its own quantization_config) beside a vision_config; their weights put the text
model under a prefix (`language_model.model.*` + `language_model.lm_head.*` as Kimi-K2.5 ships them,
or `model.language_model.*` + `lm_head.*` as transformers saves them) next to the vision tower and
projector, which are never read: requests are text only."""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

from cluster.errors import UnsupportedModelError
from cluster.families.base import Family

# Wrapper model_type → the text_config model_types it may wrap.
WRAPPED: dict[str, tuple[str, ...]] = {"kimi_k25": ("kimi_k2", "deepseek_v3"), "qwen3_5_moe": ("qwen3_5_moe_text",),
                                       "gemma4": ("gemma4_text",)}
# Wrappers we recognise but cannot serve yet, and why.
REFUSED: dict[str, str] = {}
# Wrapper fields the text model inherits when text_config does not set them.
_INHERITED = ("quantization_config", "torch_dtype", "dtype", "bos_token_id", "eos_token_id")
# (our "model." prefix, our "lm_head" name) as each layout stores them.
_LAYOUTS = (("language_model.model.", "language_model.lm_head"), ("model.language_model.", "lm_head"))


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config.json of the model to serve: `config` itself, or a wrapper's text_config."""
    kind = config.get("model_type")
    if kind in REFUSED:
        raise UnsupportedModelError(f"model_type {kind!r} is not supported: {REFUSED[kind]}")
    if kind not in WRAPPED:
        return config
    text = config.get("text_config")
    if not isinstance(text, dict):
        raise UnsupportedModelError(f"config.json: model_type {kind!r} needs a text_config object")
    if text.get("model_type") not in WRAPPED[kind]:
        raise UnsupportedModelError(f"config.json: text_config.model_type {text.get('model_type')!r} is not "
                                    f"supported inside {kind!r} (supported: {', '.join(WRAPPED[kind])})")
    return {**{k: config[k] for k in _INHERITED if k in config and k not in text}, **text}


def relocate(family: Family, config: dict[str, Any], has: Callable[[str], bool]) -> Family:
    """For a wrapper, the family with every tensor name moved under the prefix the checkpoint uses."""
    if config.get("model_type") not in WRAPPED:
        return family
    embed = family.tensors["embed"]
    for model_prefix, lm_head in _LAYOUTS:
        if has(model_prefix + embed[len("model."):]):
            return replace(family, tensors={ours: _moved(name, model_prefix, lm_head)
                                            for ours, name in family.tensors.items()})
    raise UnsupportedModelError(f"{config['model_type']} checkpoint: the text model's {embed!r} is under none of "
                                f"the prefixes {', '.join(p for p, _ in _LAYOUTS)}")


def _moved(name: str, model_prefix: str, lm_head: str) -> str:
    if name.startswith("model."):
        return model_prefix + name[len("model."):]
    return lm_head + name[len("lm_head"):] if name.startswith("lm_head") else name
