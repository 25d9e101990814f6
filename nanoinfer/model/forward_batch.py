"""ForwardBatch: one model step over many sequences, flattened, with the paged-KV addressing it needs.

Rows are tokens. The first `num_decode` rows are single-token decode steps of distinct sequences
(attended in one batched call); the rest are prefill chunks, one `PrefillSpan` each.
Masks and slot indices are built once per step and shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SequenceChunk:
    """What the runner asks of one sequence this step."""

    token_ids: list[int]  # the new tokens to compute (1 for decode)
    start_pos: int  # tokens of this sequence already in the KV cache
    block_table: list[int]  # KV blocks covering positions [0, start_pos + len(token_ids))
    want_logits: bool = True  # False for a prefill chunk that does not end the prompt
    num_logits: int = 1  # rows at the chunk's end that need logits (1 + drafts when verifying a guess)


@dataclass
class PrefillSpan:
    start: int  # first row in the flat batch
    length: int  # number of query rows
    context_slots: torch.Tensor  # [ctx] KV slots of positions 0..ctx-1
    mask: torch.Tensor | None  # [length, ctx] bool (True = attend); None = plain causal, no cached context
    sliding_mask: torch.Tensor | None  # the same with the sliding window applied


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T] where each row's K/V is written
    num_decode: int
    # Paged addressing of every row: each chunk's KV blocks up to its last new token, zero-padded
    # ([chunks, blocks]; the first D belong to the decode rows), which table each row reads (None
    # when every chunk is one row, so row b reads table b), and each row's keys, its own token
    # the last of them (ctx_lens = positions + 1): causality needs no mask.
    block_tables: torch.Tensor
    table_of_row: torch.Tensor | None
    ctx_lens: torch.Tensor  # [T]
    decode_mask: torch.Tensor | None  # [D, 1, 1, max_ctx] bool; None when no padding is needed
    decode_sliding_mask: torch.Tensor | None
    decode_ctx: int = 0  # longest decode context: keys past it are cut after the block gather
    block_size: int = 16
    prefills: list[PrefillSpan] = field(default_factory=list)
    logits_indices: torch.Tensor | None = None  # rows fed to the LM head; None = every row

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @classmethod
    def build(
        cls,
        chunks: list[SequenceChunk],
        block_size: int,
        sliding_window: int | None = None,
        device: torch.device | str = "cpu",
        all_logits: bool = False,
    ) -> ForwardBatch:
        """Flatten chunks (one-token chunks first, so they share one attention call) into one batch."""
        chunks = [row for c in chunks for row in _as_decode_rows(c)]
        # Any leading one-token chunk attends like a decode step, prefix-hit prompts included.
        num_decode = 0
        while num_decode < len(chunks) and len(chunks[num_decode].token_ids) == 1:
            num_decode += 1
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_rows: list[int] = []
        for c in chunks:
            row0 = len(ids)
            ids.extend(c.token_ids)
            new_pos = range(c.start_pos, c.start_pos + len(c.token_ids))
            positions.extend(new_pos)
            slots.extend(_slot(c.block_table, p, block_size) for p in new_pos)
            if c.want_logits:
                end = row0 + len(c.token_ids)
                logits_rows.extend(range(end - c.num_logits, end))
        t = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
        decode_mask = decode_sliding = None
        decode_ctx = max((c.start_pos + 1 for c in chunks[:num_decode]), default=0)
        if num_decode:
            decode_mask, decode_sliding = _decode_masks(chunks[:num_decode], sliding_window, device)
        prefills = []
        row = num_decode
        for c in chunks[num_decode:]:
            prefills.append(_prefill_span(c, row, block_size, sliding_window, device))
            row += len(c.token_ids)
        block_tables, table_of_row = _block_tables(chunks, block_size, device)
        positions_t = t(positions)
        return cls(
            input_ids=t(ids),
            positions=positions_t,
            slot_mapping=t(slots),
            num_decode=num_decode,
            block_tables=block_tables,
            table_of_row=table_of_row if prefills else None,
            ctx_lens=positions_t + 1,
            decode_ctx=decode_ctx,
            block_size=block_size,
            decode_mask=decode_mask,
            decode_sliding_mask=decode_sliding,
            prefills=prefills,
            logits_indices=None if all_logits else t(logits_rows),
        )


def _as_decode_rows(c: SequenceChunk) -> list[SequenceChunk]:
    """A chunk verifying drafts (logits on every row) as one-token chunks, one per position, each
    reading the keys up to its own: exactly causal attention, since every row's K/V is written
    before any row attends. Its rows then run as decode rows, in the fused C decode stack when
    the model can (speculative verification at decode speed, not prompt speed)."""
    n = len(c.token_ids)
    if n == 1 or not c.want_logits or c.num_logits != n:
        return [c]
    return [SequenceChunk([t], c.start_pos + i, c.block_table) for i, t in enumerate(c.token_ids)]


def _slot(block_table: list[int], pos: int, block_size: int) -> int:
    return block_table[pos // block_size] * block_size + pos % block_size


def _context_slots(block_table: list[int], ctx: int, block_size: int) -> torch.Tensor:
    blocks = torch.tensor(block_table[: (ctx + block_size - 1) // block_size], dtype=torch.long)
    offsets = torch.arange(block_size, dtype=torch.long)
    return (blocks.unsqueeze(1) * block_size + offsets).flatten()[:ctx]


def _block_tables(chunks: list[SequenceChunk], block_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Every chunk's blocks up to its last new token (zero-padded to the longest), and per row its chunk."""
    used = [-(-(c.start_pos + len(c.token_ids)) // block_size) for c in chunks]
    tables = torch.zeros(len(chunks), max(used), dtype=torch.long)
    for i, c in enumerate(chunks):
        tables[i, : used[i]] = torch.tensor(c.block_table[: used[i]], dtype=torch.long)
    lengths = torch.tensor([len(c.token_ids) for c in chunks])
    return tables.to(device), torch.repeat_interleave(torch.arange(len(chunks)), lengths).to(device)


def _decode_masks(
    chunks: list[SequenceChunk], window: int | None, device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """SDPA masks over the decode rows' padded contexts (the torch path)."""
    lens = [c.start_pos + 1 for c in chunks]
    max_ctx = max(lens)
    key_pos = torch.arange(max_ctx)
    lens_t = torch.tensor(lens).unsqueeze(1)
    valid = key_pos < lens_t  # [D, max_ctx]
    mask = None if min(lens) == max_ctx else valid.view(len(chunks), 1, 1, max_ctx).to(device)
    sliding = None
    if window is not None and max_ctx > window:
        # the query sits at position len-1; keys further back than the window drop out
        sliding = (valid & (key_pos > lens_t - 1 - window)).view(len(chunks), 1, 1, max_ctx).to(device)
    return mask, sliding


def _prefill_span(c: SequenceChunk, row: int, block_size: int, window: int | None, device) -> PrefillSpan:
    q = len(c.token_ids)
    ctx = c.start_pos + q
    query_pos = torch.arange(c.start_pos, ctx).unsqueeze(1)
    key_pos = torch.arange(ctx).unsqueeze(0)
    causal = key_pos <= query_pos
    mask = None if c.start_pos == 0 else causal.to(device)
    sliding = None
    if window is not None and ctx > window:
        sliding = (causal & (key_pos > query_pos - window)).to(device)
    slots = _context_slots(c.block_table, ctx, block_size).to(device)
    return PrefillSpan(row, q, slots, mask, sliding)
