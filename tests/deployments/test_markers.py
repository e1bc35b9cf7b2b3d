"""The shared marker helpers every reply format reads with: whole blocks, and a stream's holdback."""
from __future__ import annotations

import pytest

from deployments.api.markers import Holdback, blocks


@pytest.mark.parametrize("section, expected", [
    ("<a>x</a>", ["x"]),
    (" [ <a>x</a>\n<a>y</a> ] ", ["x", "y"]),  # wrappers and whitespace between blocks are fine
    ("", []),
    ("<a>x</a> text", None),  # anything else after the calls
    ("<a>x</a><a>y", None),  # cut off inside a block
    ("lead <a>x</a>", None),
])
def test_blocks(section, expected):
    assert blocks(section, "<a>", "</a>", ("[", "]")) == expected


@pytest.mark.parametrize("size", [1, 2, 3, 7, 100])
def test_holdback_lets_out_only_what_cannot_be_the_marker(size):
    text = "Hi <to<tool_call>{}</tool_call>"
    hold = Holdback("<tool_call>")
    out = "".join(hold.feed(text[i:i + size]) for i in range(0, len(text), size))
    assert out == "Hi <to" and hold.found and hold.text == text and hold.sent == len("Hi <to")


def test_holdback_without_a_marker_lets_everything_out():
    hold = Holdback(None)
    assert hold.feed("a<") + hold.feed("b") == "a<b"
