"""Constrained decoding with xgrammar: a sequence with a grammar may only sample tokens that keep its
output inside it (JSON, or JSON matching a schema).

    spec = GrammarSpec.json_schema('{"type": "object", ...}')   # in SamplingParams: small, picklable
    check(spec)                                                 # on the ingress: ValueError naming what is unsupported
    grammars = Grammars(tokenizer, vocab_size, stop_ids)        # per engine, built on first use
    matcher = grammars.matcher(spec)                            # per sequence (compiled once per spec)
    grammars.mask(logits, [(row, matcher), ...])                # per step: one batched bitmask
    matcher.accept_token(token)                                 # after sampling

A reply that starts inside a reasoning block (the prompt opened "<think>") is constrained only after it:
`reasoning_end` holds the block's end marker as token ids, and the engine starts the matcher on the token
after the generated ids end with them (vLLM's `is_reasoning_end`); the reasoning before is free text.

Only the spec crosses processes; compiled grammars and matchers live in the router's engine. JSON is
compact (no free whitespace): a model cannot fill its budget with blanks. xgrammar is imported on first
use, so sequences without a grammar (and engines that never see one) pay nothing.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import torch

ANY_JSON = "json_object"
SCHEMA = "json_schema"
# Pieces a tool-call format is built from where its arguments are not one JSON object (bare-text values,
# names outside the JSON): fixed text, free text up to the next tag, a regex, and their sequences / choices.
LITERAL, TEXT, REGEX, SEQUENCE, ANY_OF = "literal", "text", "regex", "sequence", "any_of"


@dataclass(frozen=True)
class GrammarSpec:
    kind: str  # ANY_JSON: any JSON object; SCHEMA: JSON valid against `schema`; or one of the pieces above
    schema: str = ""  # the JSON schema, as compact text (the cache key); LITERAL's text; REGEX's pattern
    prefix: str = ""  # literal text before the JSON (a tool-call format's opening, e.g. "<tool_call>\n")
    suffix: str = ""  # and after it
    parts: tuple["GrammarSpec", ...] = ()  # SEQUENCE / ANY_OF: the pieces
    # the reply starts in a reasoning block ended by these token ids ("</think>"): the grammar applies from
    # the token after them, the reasoning is free. () = from the first token. Set on the whole spec only.
    reasoning_end: tuple[int, ...] = ()

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | str) -> "GrammarSpec":
        text = schema if isinstance(schema, str) else json.dumps(schema, separators=(",", ":"))
        return cls(SCHEMA, text)

    @classmethod
    def wrapped(cls, schema: dict[str, Any], prefix: str, suffix: str) -> "GrammarSpec":
        return cls(SCHEMA, json.dumps(schema, separators=(",", ":")), prefix, suffix)

    @classmethod
    def json_object(cls) -> "GrammarSpec":
        return cls(ANY_JSON)

    @classmethod
    def literal(cls, text: str) -> "GrammarSpec":
        return cls(LITERAL, text)

    @classmethod
    def text(cls) -> "GrammarSpec":
        """Free text without `<` (a bare value, ended by the format's next tag)."""
        return cls(TEXT)

    @classmethod
    def regex(cls, pattern: str) -> "GrammarSpec":
        return cls(REGEX, pattern)

    @classmethod
    def sequence(cls, *parts: "GrammarSpec") -> "GrammarSpec":
        return cls(SEQUENCE, parts=parts)

    @classmethod
    def any_of(cls, *parts: "GrammarSpec") -> "GrammarSpec":
        return parts[0] if len(parts) == 1 else cls(ANY_OF, parts=parts)


@lru_cache(maxsize=256)
def check(spec: GrammarSpec) -> None:
    """Raise ValueError (xgrammar's words: the feature or the mistake) when `spec` cannot be compiled."""
    try:
        import xgrammar as xgr
    except ImportError:
        raise ValueError("constrained decoding needs xgrammar, which this server lacks (pip install "
                         "'moe-cluster[structured]')") from None

    if spec.kind != ANY_JSON:
        try:
            grammar_of(xgr, spec)
        except Exception as e:  # noqa: BLE001 xgrammar raises RuntimeError / ValueError / its own types
            raise ValueError(f"unsupported or invalid JSON schema: {_words(e)[:300]}") from None


def _words(e: Exception) -> str:
    """xgrammar's message without the time and C++ source line it starts with ("[05:24:31]
    /project/cpp/json_schema_converter.cc:4944: Unsupported type ...")."""
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(e).strip())


def grammar_of(xgr, spec: GrammarSpec):
    """The xgrammar Grammar of a spec: JSON (compact) for the schema, between the literal prefix and suffix;
    the pieces of a bare-text call format as they say."""
    if spec.kind == LITERAL:
        return _literal(xgr, spec.schema)
    if spec.kind == TEXT:
        return xgr.Grammar.from_ebnf("root ::= [^<]*")
    if spec.kind == REGEX:
        return xgr.Grammar.from_regex(spec.schema)
    if spec.kind in (SEQUENCE, ANY_OF):
        parts = [grammar_of(xgr, p) for p in spec.parts]
        return xgr.Grammar.concat(*parts) if spec.kind == SEQUENCE else xgr.Grammar.union(*parts)
    # json_object is an object, not any JSON value (xgrammar's built-in JSON grammar allows `[1]`)
    schema = '{"type": "object"}' if spec.kind == ANY_JSON else spec.schema
    body = xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=spec.kind == SCHEMA)
    if not (spec.prefix or spec.suffix):
        return body
    return xgr.Grammar.concat(*([_literal(xgr, spec.prefix)] if spec.prefix else []), body,
                              *([_literal(xgr, spec.suffix)] if spec.suffix else []))


def _literal(xgr, text: str):
    return xgr.Grammar.from_ebnf("root ::= " + json.dumps(text, ensure_ascii=False))


class Grammars:
    """One engine's grammar compiler (over its tokenizer's vocabulary) and compiled grammars by spec."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: tuple[int, ...]):
        import xgrammar as xgr

        self.xgr = xgr
        tok = tokenizer.tok
        vocab = [""] * tok.get_vocab_size()
        for text, token in tok.get_vocab().items():
            vocab[token] = text
        info = xgr.TokenizerInfo(vocab, vocab_type=_vocab_type(xgr, tok.to_str()), vocab_size=vocab_size,
                                 stop_token_ids=list(stop_ids))
        self.vocab_size = vocab_size
        self.compiler = xgr.GrammarCompiler(info, max_threads=1)
        self.compiled = lru_cache(maxsize=64)(self._compile)
        self.batch = xgr.BatchGrammarMatcher()
        self.bitmask = None  # [rows, ceil(V / 32)] int32, grown to the largest batch seen

    def _compile(self, spec: GrammarSpec):
        return self.compiler.compile_grammar(grammar_of(self.xgr, spec))

    def matcher(self, spec: GrammarSpec):
        """A fresh matcher (where it starts is the engine's business: `reasoning_end` is not compiled)."""
        return self.xgr.GrammarMatcher(self.compiled(replace(spec, reasoning_end=()) if spec.reasoning_end else spec))

    def mask(self, logits, rows: list[tuple[int, Any]]) -> None:
        """Set to -inf, in place, every token a row's matcher forbids. One bitmask for the batch (kept
        between steps), filled for the constrained rows only by xgrammar's batch matcher and applied to
        those rows in place: no copy of the logits, no Python loop over rows or the vocabulary."""
        indices = [row for row, _ in rows]
        bitmask = self._bitmask(logits.shape[0])
        self.batch.batch_fill_next_token_bitmask([matcher for _, matcher in rows], bitmask, indices)
        with torch.inference_mode():  # the logits come from the model's forward, an inference tensor
            self.xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self.vocab_size, indices=indices)

    def _bitmask(self, batch: int):
        if self.bitmask is None or self.bitmask.shape[0] < batch:
            self.bitmask = self.xgr.allocate_token_bitmask(batch, self.vocab_size)
        return self.bitmask


def _vocab_type(xgr, spec: str):
    """How token strings map to bytes, from tokenizer.json's decoder: byte-level BPE (GPT-2 style, one
    printable character per byte), byte fallback (<0x1F> tokens, SentencePiece style), or raw text.
    Guessing wrong lets a token through whose bytes break JSON (a raw control character)."""
    decoder = json.loads(spec).get("decoder") or {}
    kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", [])}
    if "ByteLevel" in kinds:
        return xgr.VocabType.BYTE_LEVEL
    return xgr.VocabType.BYTE_FALLBACK if "ByteFallback" in kinds else xgr.VocabType.RAW
