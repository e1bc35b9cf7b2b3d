"""Text ↔ token ids through the checkpoint's tokenizer.json (the tokenizers library).

Special tokens are added to text prompts exactly as transformers' tokenizer adds
them: by tokenizer.json's post-processor (a TemplateProcessing that puts BOS
first, for Mixtral or DeepSeek; none for Qwen). transformers 5 drops
tokenizer_config.json's add_bos_token / add_eos_token whenever tokenizer.json
exists (tokenization_utils_base.from_pretrained), so those flags change nothing
here either; tests/cluster/test_generation_config.py checks both against it.
Checkpoints without tokenizer.json (tiktoken or sentencepiece files with custom
code, as Kimi-K2 ships) are not loaded: `missing_reason` says what was found and
what to do.
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

_OTHER_FORMATS = ("tiktoken.model", "tokenizer.model", "vocab.json", "tokenizer.tiktoken")


class TextTokenizer:
    def __init__(self, path: Path):
        self.tok = Tokenizer.from_file(str(path))

    @classmethod
    def from_checkpoint(cls, root: str | Path) -> "TextTokenizer | None":
        path = Path(root) / "tokenizer.json"
        return cls(path) if path.exists() else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """add_special_tokens=False for rendered chat prompts: the template wrote its own BOS, and
        transformers' apply_chat_template and vLLM tokenise them without adding another."""
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

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
