"""A reply as its format's parser must read it. The engine's text drops special tokens (a user must not
see them), but Kimi-K2's call markers and gpt-oss's harmony channels are special tokens of their
tokenizers: there the parser reads the reply decoded from its token ids with special tokens kept, less
those its format does not read (the EOS that ends it, ...), and what goes back to the user is cleaned of
them all. vLLM does the same (its parsers turn `skip_special_tokens` off).

    view = ReplyView.needed(tokenizer, {"<|tool_calls_section_begin|>", ...})  # None: the text will do
    view.text(token_ids)            # the parser's view of a whole reply
    stream = view.stream(); stream.step(token_id)   # the same, a token at a time
    view.clean(content)             # what the user sees
"""
from __future__ import annotations

from cluster.tokenizer import TextTokenizer


class ReplyView:
    def __init__(self, tokenizer: TextTokenizer, kept: frozenset[str]):
        self.tokenizer = tokenizer
        self._others = tokenizer.specials_except(kept)
        self._all = tokenizer.specials_except(frozenset())

    @classmethod
    def needed(cls, tokenizer: TextTokenizer | None, markers: frozenset[str]) -> ReplyView | None:
        """A view when some of `markers` are special tokens of `tokenizer` (else the engine's text has them)."""
        every = tokenizer.specials_except(frozenset()) if tokenizer is not None else None
        if every is None or not any(every.fullmatch(m) for m in markers):
            return None
        return cls(tokenizer, markers)

    def text(self, token_ids: list[int]) -> str:
        return self.markers_only(self.tokenizer.decode(token_ids, skip_special_tokens=False))

    def markers_only(self, text: str) -> str:
        return self._others.sub("", text) if self._others is not None else text

    def clean(self, text: str) -> str:
        return self._all.sub("", text) if self._all is not None else text

    def stream(self) -> ViewStream:
        return ViewStream(self)


class ViewStream:
    def __init__(self, view: ReplyView):
        self.view, self.tokens = view, view.tokenizer.decode_stream()

    def step(self, token_id: int | None) -> str:
        return "" if token_id is None else self.view.markers_only(self.tokens.step(token_id))
