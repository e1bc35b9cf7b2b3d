"""Text ↔ token ids through the checkpoint's tokenizer.json (the tokenizers library).

Special tokens (BOS, and EOS where a checkpoint asks for it) are added to text
prompts exactly as transformers' tokenizer adds them: when tokenizer_config.json
sets add_bos_token / add_eos_token, transformers rebuilds the post-processor from
those flags; otherwise tokenizer.json's own post-processor decides.
Checkpoints without tokenizer.json (tiktoken or sentencepiece files, custom code)
are not loaded: `missing_reason` says what was found and what to do.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, processors

_OTHER_FORMATS = ("tiktoken.model", "tokenizer.model", "vocab.json", "tokenizer.tiktoken")


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _post_processor(tok: Tokenizer, config: dict):
    """transformers' rule (TokenizersBackend.update_post_processor) when the flags are explicit."""
    if "add_bos_token" not in config and "add_eos_token" not in config and tok.post_processor is not None:
        return tok.post_processor
    single, special = "$A:0", []
    for flag, key, where in (("add_bos_token", "bos_token", "before"), ("add_eos_token", "eos_token", "after")):
        text = _token_text(config.get(key))
        token_id = tok.token_to_id(text) if text else None
        if config.get(flag) and token_id is not None:
            single = f"{text}:0 {single}" if where == "before" else f"{single} {text}:0"
            special.append((text, token_id))
    return processors.TemplateProcessing(single=single, special_tokens=special)


class TextTokenizer:
    def __init__(self, path: Path, config: dict | None = None):
        self.tok = Tokenizer.from_file(str(path))
        self.tok.post_processor = _post_processor(self.tok, config or {})

    @classmethod
    def from_checkpoint(cls, root: str | Path) -> "TextTokenizer | None":
        root = Path(root)
        path, config_path = root / "tokenizer.json", root / "tokenizer_config.json"
        if not path.exists():
            return None
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        return cls(path, config)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def missing_reason(root: str | Path) -> str:
    """Why a checkpoint has no usable tokenizer, for the error a text prompt gets."""
    found = [name for name in _OTHER_FORMATS if (Path(root) / name).exists()]
    if not found:
        return "this checkpoint has no tokenizer.json: send token ids"
    return (f"this checkpoint ships {', '.join(found)} but no tokenizer.json, and moe-cluster reads tokenizer.json "
            "only (tiktoken and sentencepiece tokenizers come with model-specific code): send token ids, or "
            "convert the tokenizer to tokenizer.json once (e.g. transformers' TikTokenConverter with the split "
            "pattern from the checkpoint's tokenization code) and put it beside config.json")
