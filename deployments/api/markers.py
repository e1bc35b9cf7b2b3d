"""Text between fixed markers, the one shape every reply format shares: whole blocks read out of a
finished reply (tool calls), and text let out of a stream only up to where a marker may begin.

    blocks("<a>x</a> <a>y</a>", "<a>", "</a>") == ["x", "y"]
    hold = Holdback("<tool_call>"); hold.feed("Hi <tool") == "Hi "   # "<tool" may be the marker

Pure text functions: no state beyond a Holdback's own stream.
"""
from __future__ import annotations


def blocks(section: str, begin: str, end: str, wrappers: tuple[str, ...] = ()) -> list[str] | None:
    """The text inside each `begin`…`end` block of `section`, in order; None when `section` holds anything
    but those blocks, the `wrappers` (a format's section markers) and whitespace, or a block is not closed
    (cut off by max_tokens): such a section is not a well-formed run of blocks."""
    inner, at = [], 0
    while (start := section.find(begin, at)) >= 0:
        stop = section.find(end, start + len(begin))
        if stop < 0 or not _only(section[at:start], wrappers):
            return None
        inner.append(section[start + len(begin):stop])
        at = stop + len(end)
    return inner if _only(section[at:], wrappers) else None


def _only(text: str, wrappers: tuple[str, ...]) -> bool:
    for wrapper in wrappers:
        text = text.replace(wrapper, "")
    return not text.strip()


def partial_marker(text: str, marker: str) -> int:
    """The length of the longest end of `text` that is a beginning of `marker` (it may yet become it)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class Holdback:
    """A stream let out up to `marker` (None: all of it). Text that may be the marker's beginning waits
    for the next piece; from the marker on, everything is held (`text` keeps the whole stream)."""

    def __init__(self, marker: str | None):
        self.marker = marker
        self.text = ""
        self.sent = 0  # characters of `text` let out
        self.found = False

    def feed(self, delta: str) -> str:
        self.text += delta
        if self.marker is None:
            self.sent = len(self.text)
            return delta
        if self.found:
            return ""
        at = self.text.find(self.marker, max(self.sent - len(self.marker), 0))
        end = at if at >= 0 else len(self.text) - partial_marker(self.text, self.marker)
        self.found = at >= 0
        out, self.sent = self.text[self.sent:end], max(end, self.sent)
        return out
