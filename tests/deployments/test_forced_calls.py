"""tool_choice required / named in every family's own call format: the grammar of a forced call, walked
token by token at random through xgrammar over a real tokenizer (any path the grammar allows is a reply a
model could give), always parses back, with that family's parser, into one call whose arguments validate
against the tool's schema. In process, no model; the served path is in test_structured_outputs.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel, Field
from typing import Literal

from cluster.engine.grammar import GrammarSpec, check
from cluster.tokenizer import TextTokenizer
from deployments.api.reply_view import ReplyView
from deployments.api.tool_parsers import PARSERS, forced_call, marker_tokens, parse
from tests.helpers import DEMO

xgr = pytest.importorskip("xgrammar")


class Weather(BaseModel):
    city: str = Field(pattern=r"^[A-Za-z ]{1,6}$")
    days: int = Field(ge=1, le=9)
    unit: Literal["c", "f"]
    detail: bool | None = None  # optional: the bare-text formats may leave it out


SCHEMAS = {"search": Weather.model_json_schema(),
           "noop": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}}


@pytest.fixture(scope="module")
def grammars():
    from cluster.engine.grammar import Grammars

    tokenizer = TextTokenizer(Path(DEMO / "tokenizer.json"))
    return tokenizer, Grammars(tokenizer, tokenizer.tok.get_vocab_size(), (0,))


def walk_ids(grammars, spec: GrammarSpec, seed: int) -> list[int]:
    """A reply's token ids, each sampled uniformly among the tokens the grammar allows, to its end (the
    stop token that ends it included)."""
    matcher, out = grammars.matcher(spec), []
    generator = torch.Generator().manual_seed(seed)
    while not matcher.is_terminated() and len(out) < 400:
        logits = torch.zeros(1, grammars.vocab_size)
        grammars.mask(logits, [(0, matcher)])
        token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))
        assert matcher.accept_token(token)
        out.append(token)
    assert matcher.is_terminated(), "the walk did not end"
    return out


def walk(tokenizer, grammars, spec: GrammarSpec, seed: int) -> str:
    """Such a reply's text (the demo tokenizer's stop token, 0, left out)."""
    out = walk_ids(grammars, spec, seed)
    return tokenizer.decode(out[:-1] if out[-1] == 0 else out)


@pytest.mark.parametrize("parser", sorted(PARSERS))
def test_a_forced_call_parses_back_into_a_valid_call(grammars, parser):
    tokenizer, compiled = grammars
    for names, seeds in ((["search"], range(3)), (["search", "noop"], range(3, 6))):
        spec = forced_call(parser, SCHEMAS, names)
        check(spec)
        for seed in seeds:
            text = walk(tokenizer, compiled, spec, seed)
            parsed = parse(text, parser, SCHEMAS)
            assert len(parsed.calls) == 1 and parsed.calls[0].name in names, (parser, text)
            arguments = parsed.calls[0].arguments
            if parsed.calls[0].name == "search":
                Weather.model_validate_json(arguments)
            else:
                assert isinstance(json.loads(arguments)["ok"], bool)


@pytest.mark.parametrize("parser", ["qwen3_coder", "glm45"])
def test_bare_text_formats_refuse_what_they_cannot_write_by_name(parser):
    for schema, words in (({"type": "object", "properties": {"q": {"type": "string", "maxLength": 9}}}, "'q'"),
                          ({"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}}, "$ref")):
        with pytest.raises(ValueError, match=parser) as e:
            forced_call(parser, {"f": schema}, ["f"])
        assert words in str(e.value)


# DeepSeek's call markers are special tokens of its tokenizer (Kimi-K2's too): xgrammar, matching the
# marker's text, may take the special token or spell it in byte pieces, and the engine's text drops the
# special ones. What the parser reads is the server's view of the reply (deployments/api/reply_view.py).
SPECIAL_EOS = {"deepseek_v3": "<｜end▁of▁sentence｜>", "deepseek_v31": "<｜end▁of▁sentence｜>", "kimi_k2": "<|im_end|>"}


@pytest.mark.parametrize("parser", sorted(SPECIAL_EOS))
def test_a_forced_call_over_markers_that_are_special_tokens(tmp_path, parser):
    from tokenizers import AddedToken, Tokenizer
    from cluster.engine.grammar import Grammars

    raw = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
    demo_vocab = raw.get_vocab_size()  # the markers' ids come after it
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in (*marker_tokens(parser), SPECIAL_EOS[parser])])
    raw.save(str(tmp_path / "tokenizer.json"))
    tokenizer = TextTokenizer(tmp_path / "tokenizer.json")
    eos = raw.token_to_id(SPECIAL_EOS[parser])
    compiled = Grammars(tokenizer, raw.get_vocab_size(), (eos,))
    view = ReplyView.needed(tokenizer, frozenset(marker_tokens(parser)))
    assert view is not None
    spec, specials_taken = forced_call(parser, SCHEMAS, ["search", "noop"]), 0
    for seed in range(8):
        ids = walk_ids(compiled, spec, seed)
        ids = ids[:-1] if ids[-1] == eos else ids
        specials_taken += any(i >= demo_vocab for i in ids)
        text = view.text(ids, tokenizer.decode(ids))
        parsed = parse(text, parser, SCHEMAS)
        assert len(parsed.calls) == 1 and not view.clean(parsed.content or ""), (parser, text)
        if parsed.calls[0].name == "search":
            Weather.model_validate_json(parsed.calls[0].arguments)
    assert specials_taken, "no walk took a marker as its special token: the case under test never came up"
