"""A ragged batch: the new tokens of many sequences, flattened into T rows.

A step mixes prefills (many new tokens) and decodes (one new token) of
different sequences; linear layers and experts see one [T, D] matrix, only
attention looks at the sequence boundaries. Where each token lives in the paged
KV cache is worked out here once per step, for every layer to use, and so is each
sequence's recurrent-state slot (hybrid models' linear-attention layers). What those layers need
beyond the slots (which states start at zero, the prefill chunks' rows and bounds) is built on the
first layer's request and kept for the rest of the step (cached properties): one small host->device
copy a step instead of several a layer, and nothing for models without linear layers.
Shapes: T rows, B decoding sequences, C context, N prefill chunks, P their rows in all.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import torch
from torch import Tensor


@dataclass(frozen=True)
class SeqChunk:
    start: int  # first row of this chunk in the flattened batch
    num_tokens: int  # new tokens this step
    context_len: int  # tokens in the cache after this step
    context_slots: Tensor  # [context_len] cache slot of each of the sequence's tokens
    state_slot: int = 0  # its recurrent-state slot (hybrid models)


@dataclass(frozen=True)
class DecodeGroup:
    """The chunks with one new token, attended together (padded to the longest context)."""

    rows: Tensor  # [B] row of each sequence's token
    lens: Tensor  # [B] context length of each
    context_slots: Tensor  # [B, C] cache slots, padded with slot 0 (masked out)
    state_slots: Tensor | None = None  # [B] recurrent-state slot of each


@dataclass(frozen=True)
class PrefillGroup:
    """The chunks with more than one new token, as the linear layers read and write their states."""

    rows: Tensor  # [P] their rows, chunk after chunk
    state_slots: Tensor  # [N] recurrent-state slot of each
    fresh: Tensor  # [N] True: the sequence's first chunk (its state starts at zero)
    cu_seqlens: Tensor  # [N + 1] chunk i is rows[cu_seqlens[i]:cu_seqlens[i + 1]]
    cu_seqlens_cpu: Tensor  # [N + 1] the same bounds on the host: slicing by them reads no device tensor


def prefill_group(chunks: tuple[SeqChunk, ...], device) -> PrefillGroup:
    """The PrefillGroup of prefill `chunks`: built on the host, moved in one copy."""
    rows = [torch.arange(c.start, c.start + c.num_tokens) for c in chunks]
    lens = torch.tensor([0] + [c.num_tokens for c in chunks])
    fresh = torch.tensor([c.context_len == c.num_tokens for c in chunks], dtype=torch.long)
    slots = torch.tensor([c.state_slot for c in chunks])
    host = torch.cat([*rows, slots, fresh, lens.cumsum(0)]).to(device)
    rows, slots, fresh, cu = host.split([int(lens.sum()), len(chunks), len(chunks), len(chunks) + 1])
    return PrefillGroup(rows, slots, fresh.bool(), cu, lens.cumsum(0))


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

    @cached_property
    def prefills(self) -> tuple[SeqChunk, ...]:
        return tuple(c for c in self.chunks if c.num_tokens > 1)

    @cached_property
    def decode_only(self) -> bool:
        """Every row is a decoding sequence's token, in row order: the decode group's rows are all rows."""
        return self.decode is not None and all(c.num_tokens == 1 for c in self.chunks)

    @cached_property
    def decode_fresh(self) -> Tensor | None:
        """[B] True where a decoding sequence's recurrent state starts at zero (its first token), or None
        where none does: known on the host, so the common step masks nothing."""
        fresh = [c.context_len == 1 for c in self.chunks if c.num_tokens == 1]
        return torch.tensor(fresh, device=self.token_ids.device) if any(fresh) else None

    @cached_property
    def prefill(self) -> PrefillGroup | None:
        return prefill_group(self.prefills, self.token_ids.device) if self.prefills else None


def _slot_grid(tables: list[list[int]], contexts: list[int], block_size: int) -> Tensor:
    """[B, C] cache slot of every context position of every sequence (C the longest context), slot 0
    past a sequence's end: built on the host in a few ops for the whole batch, moved once."""
    width = max(contexts)
    blocks = -(-width // block_size)
    table = torch.tensor([t[:blocks] + [0] * (blocks - len(t[:blocks])) for t in tables], dtype=torch.long)
    pos = torch.arange(width)
    grid = table[:, pos // block_size] * block_size + pos % block_size  # [B, C]
    return grid.masked_fill_(pos[None, :] >= torch.tensor(contexts)[:, None], 0)


def make_batch(items: list[tuple[list[int], list[int], int]], block_size: int, device: str = "cpu",
               state_slots: list[int] | None = None) -> Batch:
    """items: (block table, new token ids, position of the first new token) per sequence.
    state_slots: each sequence's recurrent-state slot (None: sequence i in slot i)."""
    state_slots = list(range(len(items))) if state_slots is None else state_slots
    ids, pos, owner, starts, contexts = [], [], [], [], []
    for i, (_, tokens, start_pos) in enumerate(items):
        starts.append(len(ids))
        contexts.append(start_pos + len(tokens))
        ids += tokens
        pos += range(start_pos, start_pos + len(tokens))
        owner += [i] * len(tokens)
    host = _slot_grid([table for table, _, _ in items], contexts, block_size)  # [B, C]
    grid = host.to(device)
    chunks = tuple(SeqChunk(s, len(tokens), c, grid[i, :c], state_slots[i])
                   for i, (s, (_, tokens, _), c) in enumerate(zip(starts, items, contexts)))
    as_long = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
    decodes = [i for i, c in enumerate(chunks) if c.num_tokens == 1]
    decode = None
    if decodes:  # padded to the longest decoding context with slot 0 (masked out by the lengths)
        width = max(contexts[i] for i in decodes)
        decode = DecodeGroup(as_long([starts[i] for i in decodes]), as_long([contexts[i] for i in decodes]),
                             grid[as_long(decodes), :width], as_long([state_slots[i] for i in decodes]))
    slot_mapping = host[torch.tensor(owner, dtype=torch.long), torch.tensor(pos, dtype=torch.long)]  # [T]
    last = [s + len(tokens) - 1 for s, (_, tokens, _) in zip(starts, items)]
    return Batch(as_long(ids), as_long(pos), slot_mapping.to(device), chunks, as_long(last), decode)


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
    return DecodeGroup(d.rows[sel] - r0, d.lens[sel], d.context_slots[sel, :width],
                       None if d.state_slots is None else d.state_slots[sel])


def one_chunk(prefill: PrefillGroup, i: int) -> tuple[Tensor, Tensor]:
    """Prefill chunk i's state slot and fresh flag, [1] each: views of the step's group, no new tensor."""
    return prefill.state_slots[i:i + 1], prefill.fresh[i:i + 1]
