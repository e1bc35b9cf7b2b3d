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

import json
import re
from functools import cached_property, lru_cache
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: printable bytes stand for themselves, the other 68 are
    moved to 256 and up (the table every byte-level BPE vocabulary is written in)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(256 + i): b for i, b in enumerate(moved)}}


_UNICODE_TO_BYTE = _byte_alphabet()
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

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for, a part of a UTF-8 character included (what OpenAI's logprobs
        `bytes` carry, so a client can join them), where its decoded text would be U+FFFD."""
        piece = self.tok.id_to_token(token_id)
        if piece is None:
            return b""
        if token_id not in self._added:  # an added token's text is as written, in no byte alphabet
            if self._byte_level and all(c in _UNICODE_TO_BYTE for c in piece):
                return bytes(_UNICODE_TO_BYTE[c] for c in piece)
            if not self._byte_level and _BYTE_FALLBACK.fullmatch(piece):  # sentencepiece's byte fallback: <0xCA>
                return bytes([int(piece[3:5], 16)])
        return self.token_text(token_id).encode("utf-8")

    @lru_cache(maxsize=1 << 16)  # two decodes a token, for every chosen and top logprob
    def token_text(self, token_id: int) -> str:
        """The text a token adds after other text, special tokens written out. Alone, a sentencepiece
        word loses its space (Mixtral's decoder strips the text's first one: '▁yo' reads 'yo', but ' yo'
        after a word), so it is read after an anchor token and the anchor's text taken off. (A reply's
        first token keeps it too, where the reply's text, decoded alone, starts without it.)"""
        alone = self.tok.decode([token_id], skip_special_tokens=False)
        if token_id in self._added or self._byte_level or self._anchor is None:
            return alone
        anchor, anchor_text = self._anchor
        after = self.tok.decode([anchor, token_id], skip_special_tokens=False)
        return after[len(anchor_text):] if after.startswith(anchor_text) else alone

    @cached_property
    def _anchor(self) -> tuple[int, str] | None:
        """A plain word token and its text alone (None for a vocabulary that cannot write "a")."""
        ids = self.tok.encode("a", add_special_tokens=False).ids
        return (ids[-1], self.tok.decode(ids[-1:], skip_special_tokens=False)) if ids else None

    @cached_property
    def _added(self) -> frozenset[int]:
        return frozenset(self.tok.get_added_tokens_decoder())

    @cached_property
    def _byte_level(self) -> bool:
        """GPT-2's byte-level vocabulary (Qwen, DeepSeek, gpt-oss, ...): each byte written as one character."""
        return '"ByteLevel"' in json.dumps(json.loads(self.tok.to_str()).get("decoder"))

    def decode_stream(self, skip_special_tokens: bool = False) -> "TokenStream":
        """Incremental decoding (special tokens kept unless skipped): one token at a time, no
        re-decoding of the past; the pieces join into what `decode` gives for the whole."""
        return TokenStream(self.tok, skip_special_tokens)

    @lru_cache(maxsize=64)
    def specials_except(self, kept: frozenset[str]) -> re.Pattern | None:
        """A pattern for the text of every special token but `kept` (None when there is none): what
        `decode` drops, for text decoded with special tokens kept."""
        texts = {t.content for t in self.tok.get_added_tokens_decoder().values() if t.special} - kept
        if not texts:
            return None
        return re.compile("|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True)))


class TokenStream:
    def __init__(self, tok: Tokenizer, skip_special_tokens: bool = False):
        self.tok, self.stream = tok, DecodeStream(skip_special_tokens=skip_special_tokens)

    def step(self, token_id: int) -> str:
        """The text token `token_id` completes ("" while a character is still partial)."""
        return self.stream.step(self.tok, token_id) or ""


def missing_reason(root: str | Path) -> str:
    """Why a checkpoint has no usable tokenizer, for the error a text prompt gets."""
    found = [name for name in _OTHER_FORMATS if (Path(root) / name).exists()]
    if not found:
        return "this checkpoint has no tokenizer.json: send token ids"
    return (f"this checkpoint ships {', '.join(found)} but no tokenizer.json, and moe-cluster reads tokenizer.json "
            "only (tiktoken and sentencepiece tokenizers come with model-specific code): send token ids, or "
            "convert the tokenizer to tokenizer.json once (e.g. transformers' TikTokenConverter with the split "
            "pattern from the checkpoint's tokenization code) and put it beside config.json")
