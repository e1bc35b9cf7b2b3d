"""A ragged batch: the new tokens of many sequences, flattened into T rows.

A step mixes prefills (many new tokens) and decodes (one new token) of
different sequences; linear layers and experts see one [T, D] matrix, only
attention looks at the sequence boundaries.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SeqChunk:
    slot: int  # KV-cache slot of the sequence
    start: int  # first row of this chunk in the flattened batch
    num_tokens: int  # new tokens this step
    context_len: int  # tokens in the cache after this step


@dataclass(frozen=True)
class Batch:
    token_ids: Tensor  # [T]
    positions: Tensor  # [T]
    slots: Tensor  # [T] cache slot of each row
    chunks: tuple[SeqChunk, ...]
    last_rows: Tensor  # [B] row of each chunk's last token: the rows that get logits

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])


def make_batch(items: list[tuple[int, list[int], int]], device: str = "cpu") -> Batch:
    """items: (slot, new token ids, position of the first new token)."""
    ids, pos, slots, chunks, last = [], [], [], [], []
    for slot, tokens, start_pos in items:
        chunks.append(SeqChunk(slot, len(ids), len(tokens), start_pos + len(tokens)))
        ids += tokens
        pos += range(start_pos, start_pos + len(tokens))
        slots += [slot] * len(tokens)
        last.append(len(ids) - 1)
    as_long = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
    return Batch(as_long(ids), as_long(pos), as_long(slots), tuple(chunks), as_long(last))
