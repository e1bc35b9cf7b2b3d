"""A reply as its format's parser must read it. The engine's text drops special tokens (a user must not
see them), but Kimi-K2's call markers and gpt-oss's harmony channels are special tokens of their
tokenizers: there the parser reads the reply decoded from its token ids with special tokens kept, less
those its format does not read (the EOS that ends it, ...), and what goes back to the user is cleaned of
them all. vLLM does the same (its parsers turn `skip_special_tokens` off).

    view = ReplyView.needed(tokenizer, {"<|tool_calls_section_begin|>", ...})  # None: the text will do
    view.text(token_ids, text)      # the parser's view of a whole reply (`text`: the engine's)
    stream = view.stream(); stream.step(token_id, delta); stream.finish()   # the same, a token at a time
    view.clean(content)             # what the user sees

The view never runs ahead of the engine's text: a stop string ends the engine's text short of the
reply's tokens (and, until the request ends, the engine holds back what could still become one), so
the view releases only as many characters as the engine has, markers kept in place.
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

    def text(self, token_ids: list[int], text: str | None = None) -> str:
        """The reply read from `token_ids`, ending where the engine's `text` ends (None: not cut)."""
        view = self.markers_only(self.tokenizer.decode(token_ids, skip_special_tokens=False))
        if text is None or len(self.clean(view)) <= len(text):
            return view  # nothing cut: every marker stays, the trailing ones too
        return view[:self.cut(view, len(text))]

    def cut(self, view: str, chars: int) -> int:
        """Where in `view` its first `chars` characters of plain text end (before any marker after them)."""
        seen, pos = 0, 0
        for m in self._all.finditer(view) if self._all is not None else ():
            plain = m.start() - pos
            if seen + plain >= chars:
                break
            seen, pos = seen + plain, m.end()
        return pos + chars - seen

    def markers_only(self, text: str) -> str:
        return self._others.sub("", text) if self._others is not None else text

    def clean(self, text: str) -> str:
        return self._all.sub("", text) if self._all is not None else text

    def stream(self) -> ViewStream:
        return ViewStream(self)


class ViewStream:
    """The view a token at a time, released as far as the engine's text has come."""

    def __init__(self, view: ReplyView):
        self.view, self.tokens = view, view.tokenizer.decode_stream()
        self.pending = ""  # read from the tokens, not released yet
        self.owed = 0  # characters of the engine's text not yet released from the view

    def step(self, token_id: int | None, delta: str) -> str:
        if token_id is not None:
            self.pending += self.view.markers_only(self.tokens.step(token_id) or "")
        self.owed += len(delta)
        return self._release(self.owed)

    def finish(self) -> str:
        """At the end: the markers left after the engine's last character (a call section's end); text
        past it (cut by a stop string) is dropped."""
        rest = self.pending if not self.view.clean(self.pending) else ""
        self.pending = ""
        return rest

    def _release(self, chars: int) -> str:
        plain = len(self.view.clean(self.pending))
        end = len(self.pending) if plain == 0 else self.view.cut(self.pending, min(chars, plain))
        out, self.pending = self.pending[:end], self.pending[end:]
        self.owed -= len(self.view.clean(out))
        return out
