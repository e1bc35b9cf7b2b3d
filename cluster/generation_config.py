"""generation_config.json: extra stop ids and the default sampling a request falls back to.

As vLLM does by default: its eos_token_id(s) join config.json's in the stop set,
and its temperature / top_p / top_k apply to a request that gives none (see
SamplingParams). Other keys (do_sample, max_length, repetition_penalty, ...) are
not used: do_sample is not a serving switch (a request asks for greedy with
temperature 0) and a request's max_tokens bounds its length.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GenerationDefaults:
    eos_token_ids: tuple[int, ...] = ()
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in (("temperature", self.temperature), ("top_p", self.top_p), ("top_k", self.top_k))
                if v is not None}


def read_generation_config(root: str | Path) -> GenerationDefaults:
    path = Path(root) / "generation_config.json"
    if not path.exists():
        return GenerationDefaults()
    try:
        g = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    eos = g.get("eos_token_id")
    eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
    num = lambda key, kind: None if g.get(key) is None else kind(g[key])  # noqa: E731
    return GenerationDefaults(tuple(int(e) for e in eos), num("temperature", float), num("top_p", float),
                              num("top_k", int))
