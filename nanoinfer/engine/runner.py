"""ModelRunner: turns scheduled chunks into a ForwardBatch, runs the model, returns logits."""

from __future__ import annotations

import torch

from nanoinfer.adapters.serving import LoRAManager
from nanoinfer.engine.scheduler import ScheduledChunk
from nanoinfer.engine.workers import ModelParallelGroup
from nanoinfer.model.forward_batch import ForwardBatch, SequenceChunk
from nanoinfer.model.kv_cache import PagedKVCache
from nanoinfer.model.transformer import Transformer


class ModelRunner:
    def __init__(
        self,
        model: Transformer,
        kv_cache: PagedKVCache,
        lora: LoRAManager | None = None,
        model_parallel: ModelParallelGroup | None = None,
    ):
        self.model = model
        self.model_parallel = model_parallel  # the other ranks run each step's chunks too
        self.kv_cache = kv_cache
        self.lora = lora  # tells the adapters which rows are whose
        self.sliding_window = model.config.sliding_window
        self.num_forwarded_tokens = 0  # tokens run through the model, for tests and stats

    def execute(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Logits for the chunks that complete their sequence, in chunk order: one row each, or
        1 + num_draft rows for a chunk verifying drafts."""
        seq_chunks = [
            SequenceChunk(
                token_ids=c.seq.token_slice(c.seq.num_computed, c.seq.num_computed + c.num_tokens - c.num_draft)
                + c.seq.draft_ids[: c.num_draft],
                start_pos=c.seq.num_computed,
                block_table=c.seq.block_table,
                want_logits=c.completes,
                num_logits=1 + c.num_draft,
            )
            for c in chunks
        ]
        self.num_forwarded_tokens += sum(len(c.token_ids) for c in seq_chunks)
        if self.model_parallel is not None:
            lora = None if self.lora is None else (self.lora.take_changes(), self._lora_rows(chunks))
            return self.model_parallel.execute(self.model, self.kv_cache, seq_chunks, lora)
        batch = ForwardBatch.build(seq_chunks, self.kv_cache.block_size, self.sliding_window, self.model.device)
        if self.lora is not None:
            self.lora.set_rows(self._lora_rows(chunks))
        return self.model(batch, self.kv_cache)

    def _lora_rows(self, chunks: list[ScheduledChunk]) -> list[tuple[int, int]]:
        """(adapter slot, rows) per chunk: rows keep chunk order, so each chunk's are contiguous."""
        assert self.lora is not None
        return [(self.lora.slot_of(c.seq.lora_id), c.num_tokens) for c in chunks]
