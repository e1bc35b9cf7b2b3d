"""Constrained decoding with xgrammar: a sequence with a grammar may only sample tokens that keep its
output inside it (JSON, or JSON matching a schema).

    spec = GrammarSpec.json_schema('{"type": "object", ...}')   # in SamplingParams: small, picklable
    check(spec)                                                 # on the ingress: ValueError naming what is unsupported
    grammars = Grammars(tokenizer, vocab_size, stop_ids)        # per engine, built on first use
    matcher = grammars.matcher(spec)                            # per sequence (compiled once per spec)
    grammars.mask(logits, [(row, matcher), ...])                # per step: one batched bitmask
    matcher.accept_token(token)                                 # after sampling

Only the spec crosses processes; compiled grammars and matchers live in the router's engine. JSON is
compact (no free whitespace): a model cannot fill its budget with blanks. xgrammar is imported on first
use, so sequences without a grammar (and engines that never see one) pay nothing.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

ANY_JSON = "json_object"
SCHEMA = "json_schema"


@dataclass(frozen=True)
class GrammarSpec:
    kind: str  # ANY_JSON: any JSON object; SCHEMA: JSON valid against `schema`
    schema: str = ""  # the JSON schema, as compact text (the cache key)
    prefix: str = ""  # literal text before the JSON (a tool-call format's opening, e.g. "<tool_call>\n")
    suffix: str = ""  # and after it

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | str) -> "GrammarSpec":
        text = schema if isinstance(schema, str) else json.dumps(schema, sort_keys=True, separators=(",", ":"))
        return cls(SCHEMA, text)

    @classmethod
    def wrapped(cls, schema: dict[str, Any], prefix: str, suffix: str) -> "GrammarSpec":
        return cls(SCHEMA, json.dumps(schema, sort_keys=True, separators=(",", ":")), prefix, suffix)

    @classmethod
    def json_object(cls) -> "GrammarSpec":
        return cls(ANY_JSON)


@lru_cache(maxsize=256)
def check(spec: GrammarSpec) -> None:
    """Raise ValueError (xgrammar's words: the feature or the mistake) when `spec` cannot be compiled."""
    try:
        import xgrammar as xgr
    except ImportError:
        raise ValueError("constrained decoding needs xgrammar, which this server lacks (pip install "
                         "'moe-cluster[structured]')") from None

    if spec.kind == SCHEMA:
        try:
            grammar_of(xgr, spec)
        except Exception as e:  # noqa: BLE001 xgrammar raises RuntimeError / ValueError / its own types
            raise ValueError(f"unsupported or invalid JSON schema: {str(e)[:300]}") from None


def grammar_of(xgr, spec: GrammarSpec):
    """The xgrammar Grammar of a spec: JSON (compact) for the schema, between the literal prefix and suffix."""
    # json_object is an object, not any JSON value (xgrammar's built-in JSON grammar allows `[1]`)
    schema = '{"type": "object"}' if spec.kind == ANY_JSON else spec.schema
    body = xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=spec.kind == SCHEMA)
    if not (spec.prefix or spec.suffix):
        return body
    literal = lambda text: xgr.Grammar.from_ebnf("root ::= " + json.dumps(text))  # noqa: E731
    return xgr.Grammar.concat(*([literal(spec.prefix)] if spec.prefix else []), body,
                              *([literal(spec.suffix)] if spec.suffix else []))


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

    def _compile(self, spec: GrammarSpec):
        return self.compiler.compile_grammar(grammar_of(self.xgr, spec))

    def matcher(self, spec: GrammarSpec):
        return self.xgr.GrammarMatcher(self.compiled(spec))

    def mask(self, logits, rows: list[tuple[int, Any]]) -> None:
        """Set to -inf, in place, every token a row's matcher forbids (one bitmask for all the rows)."""
        bitmask = self.xgr.allocate_token_bitmask(len(rows), self.vocab_size)
        for k, (_, matcher) in enumerate(rows):
            matcher.fill_next_token_bitmask(bitmask, k)
        indices = [row for row, _ in rows]
        with torch.inference_mode():  # the logits come from the model's forward, an inference tensor
            view = logits[indices]  # [R, V]: the constrained rows, masked together, written back
            self.xgr.apply_token_bitmask_inplace(view, bitmask)
            logits[indices] = view


def _vocab_type(xgr, spec: str):
    """How token strings map to bytes, from tokenizer.json's decoder: byte-level BPE (GPT-2 style, one
    printable character per byte), byte fallback (<0x1F> tokens, SentencePiece style), or raw text.
    Guessing wrong lets a token through whose bytes break JSON (a raw control character)."""
    decoder = json.loads(spec).get("decoder") or {}
    kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", [])}
    if "ByteLevel" in kinds:
        return xgr.VocabType.BYTE_LEVEL
    return xgr.VocabType.BYTE_FALLBACK if "ByteFallback" in kinds else xgr.VocabType.RAW
