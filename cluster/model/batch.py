"""A ragged batch: the new tokens of many sequences, flattened into T rows.

A step mixes prefills (many new tokens) and decodes (one new token) of
different sequences; linear layers and experts see one [T, D] matrix, only
attention looks at the sequence boundaries. Where each token lives in the paged
KV cache is worked out here once per step, for every layer to use.
Shapes: T rows, B decoding sequences, C context.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class SeqChunk:
    start: int  # first row of this chunk in the flattened batch
    num_tokens: int  # new tokens this step
    context_len: int  # tokens in the cache after this step
    context_slots: Tensor  # [context_len] cache slot of each of the sequence's tokens


@dataclass(frozen=True)
class DecodeGroup:
    """The chunks with one new token, attended together (padded to the longest context)."""

    rows: Tensor  # [B] row of each sequence's token
    lens: Tensor  # [B] context length of each
    context_slots: Tensor  # [B, C] cache slots, padded with slot 0 (masked out)


@dataclass(frozen=True)
class Batch:
    token_ids: Tensor  # [T]
    positions: Tensor  # [T]
    slot_mapping: Tensor  # [T] cache slot each new token is written to
    chunks: tuple[SeqChunk, ...]
    last_rows: Tensor  # [B] row of each chunk's last token: the rows that get logits
    decode: DecodeGroup | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def prefills(self) -> tuple[SeqChunk, ...]:
        return tuple(c for c in self.chunks if c.num_tokens > 1)


def _slots(table: list[int], num_tokens: int, block_size: int) -> Tensor:
    pos = torch.arange(num_tokens)
    return torch.tensor(table, dtype=torch.long)[pos // block_size] * block_size + pos % block_size


def _decode_group(chunks: list[SeqChunk], host_slots: list[Tensor], device: str) -> DecodeGroup | None:
    decodes = [(c, s) for c, s in zip(chunks, host_slots) if c.num_tokens == 1]
    if not decodes:
        return None
    width = max(c.context_len for c, _ in decodes)
    slots = torch.zeros(len(decodes), width, dtype=torch.long)  # [B, C], built on the host, moved once
    for i, (c, s) in enumerate(decodes):
        slots[i, :c.context_len] = s
    as_long = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
    return DecodeGroup(as_long([c.start for c, _ in decodes]), as_long([c.context_len for c, _ in decodes]),
                       slots.to(device))


def make_batch(items: list[tuple[list[int], list[int], int]], block_size: int, device: str = "cpu") -> Batch:
    """items: (block table, new token ids, position of the first new token) per sequence."""
    ids, pos, host_slots, chunks, last = [], [], [], [], []
    for table, tokens, start_pos in items:
        context = start_pos + len(tokens)
        slots = _slots(table, context, block_size)  # [C]
        chunks.append(SeqChunk(len(ids), len(tokens), context, slots.to(device)))
        host_slots.append(slots)
        ids += tokens
        pos += range(start_pos, context)
        last.append(len(ids) - 1)
    slot_mapping = torch.cat([s[c.context_len - c.num_tokens:] for c, s in zip(chunks, host_slots)])  # [T]
    as_long = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
    return Batch(as_long(ids), as_long(pos), slot_mapping.to(device), tuple(chunks), as_long(last),
                 _decode_group(chunks, host_slots, device))


def split_batch(batch: Batch, at: int) -> tuple[Batch, Batch]:
    """Sequences [0, at) and [at, B) as two batches of their own, rows renumbered from 0 in each
    (the overlap's micro-batches): the second's rows are the first's followed in the original."""
    return _part(batch, 0, at), _part(batch, at, len(batch.chunks))


def _part(batch: Batch, first: int, end: int) -> Batch:
    chunks = batch.chunks[first:end]
    r0, r1 = chunks[0].start, chunks[-1].start + chunks[-1].num_tokens
    return Batch(batch.token_ids[r0:r1], batch.positions[r0:r1], batch.slot_mapping[r0:r1],
                 tuple(replace(c, start=c.start - r0) for c in chunks), batch.last_rows[first:end] - r0,
                 _decode_part(batch, first, end, r0))


def _decode_part(batch: Batch, first: int, end: int, r0: int) -> DecodeGroup | None:
    """The decode group's entries of sequences [first, end) (it lists decodes in sequence order),
    padded only to their own longest context."""
    mine = [c for c in batch.chunks[first:end] if c.num_tokens == 1]
    if not mine:
        return None
    before = sum(c.num_tokens == 1 for c in batch.chunks[:first])
    d, sel, width = batch.decode, slice(before, before + len(mine)), max(c.context_len for c in mine)
    return DecodeGroup(d.rows[sel] - r0, d.lens[sel], d.context_slots[sel, :width])
