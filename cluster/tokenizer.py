"""Text ↔ token ids through the checkpoint's tokenizer.json (the tokenizers library)."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer


class TextTokenizer:
    def __init__(self, path: Path):
        self.tok = Tokenizer.from_file(str(path))

    @classmethod
    def from_checkpoint(cls, root: str | Path) -> "TextTokenizer | None":
        path = Path(root) / "tokenizer.json"
        return cls(path) if path.exists() else None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)
