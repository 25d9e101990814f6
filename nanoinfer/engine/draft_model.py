"""The draft-model proposer: a smaller or cheaper model guesses the next k tokens.

It keeps its own paged KV cache, a pool with as many token slots as the target's plus room for
every sequence's drafts, and each sequence holds draft blocks only while it is running. A draft
round runs the draft model in batches over every speculating sequence: first the tokens its
cache lacks (the prompt at the first round; after that the target's last token and any accepted
draft whose K/V it has not yet computed), then one token per step until each sequence has its k.
After verification, the K/V of accepted drafts are kept and the rest are overwritten next round.

Greedy rows draft the draft model's argmax, after the same penalties and bias the target applies
(a point mass, like an n-gram guess); sampled rows draw from the draft's processed distribution q,
which verification needs (speculative.verify_token), from the sequence's own generator.
"""

from __future__ import annotations

import torch

from nanoinfer.config import EngineConfig
from nanoinfer.engine.block_allocator import BlockAllocator
from nanoinfer.engine.model_setup import build_model, kv_cache_dtype
from nanoinfer.engine.sampler import processed_probs
from nanoinfer.engine.sequence import Sequence, SequenceStatus
from nanoinfer.engine.speculative import DraftState, Proposer, SpeculativeConfig
from nanoinfer.errors import NanoInferError
from nanoinfer.loading import ModelPackage, load_package
from nanoinfer.model.forward_batch import ForwardBatch, SequenceChunk
from nanoinfer.model.kv_cache import PagedKVCache
from nanoinfer.tokenizer import Tokenizer


def check_same_tokenizer(target: Tokenizer, draft: Tokenizer) -> None:
    """Raise NanoInferError naming the first difference between two tokenizers' vocabularies:
    a draft model's token ids must mean what the target's mean."""
    if draft.vocab_size != target.vocab_size:
        raise NanoInferError(
            f"the draft model's tokenizer has {draft.vocab_size} tokens, the target's {target.vocab_size}: "
            "a draft model must share the target's tokenizer"
        )
    theirs = target.backend.get_vocab(with_added_tokens=True)
    ours = draft.backend.get_vocab(with_added_tokens=True)
    for token, token_id in sorted(ours.items(), key=lambda item: item[1]):
        if theirs.get(token) != token_id:
            where = "absent" if token not in theirs else f"id {theirs[token]}"
            raise NanoInferError(
                f"the draft model's tokenizer differs from the target's: token {token!r} is id {token_id} "
                f"in the draft and {where} in the target"
            )


class DraftModelProposer(Proposer):
    """Drafts with a second model over its own paged KV cache (see the module docstring)."""

    def __init__(
        self, config: SpeculativeConfig, target: ModelPackage, engine_config: EngineConfig, target_slots: int
    ) -> None:
        super().__init__(config)
        assert config.model is not None  # SpeculativeConfig checks it for draft_model
        package = load_package(config.model)
        check_same_tokenizer(target.tokenizer, package.tokenizer)
        self.quantization = config.quantization or package.default_quantization
        c = engine_config
        self.model = build_model(package, c.dtype, self.quantization, c.device, c.dense_above_rows)
        self.vocab_size = target.config.vocab_size  # drafts are target token ids
        self.max_len = package.config.max_position_embeddings  # the draft's own window may be shorter
        self.block_size = c.block_size
        # The target's slots, plus every running sequence's drafts past them.
        per_seq = -(-(config.num_speculative_tokens + 1) // c.block_size) + 1
        num_blocks = -(-target_slots // c.block_size) + c.max_num_seqs * per_seq
        dtype = kv_cache_dtype(c.kv_cache_dtype, self.model.dtype, c.device, c.dtype)
        self.kv = PagedKVCache(package.config, num_blocks, c.block_size, dtype, c.device)
        self.allocator = BlockAllocator(num_blocks)
        self.holders: dict[int, Sequence] = {}  # id(seq) -> seq, for those holding draft blocks
        self.num_forwarded_tokens = 0

    # ---- memory ---------------------------------------------------------------------------------

    def _reserve(self, seq: Sequence, state: DraftState, num_tokens: int) -> bool:
        """Make the draft block table cover num_tokens positions; False when the pool is short."""
        need = -(-num_tokens // self.block_size) - len(state.block_table)
        if need > self.allocator.num_free:
            return False
        if need > 0:
            state.block_table += self.allocator.allocate(need)
            self.holders[id(seq)] = seq
        return True

    def _release(self, seq: Sequence) -> None:
        state = seq.draft_state
        for block in state.block_table:
            self.allocator.decref(block)
        state.block_table, state.num_computed, state.drafts = [], 0, []
        self.holders.pop(id(seq), None)

    def release_idle(self) -> None:
        for seq in [s for s in self.holders.values() if s.status is not SequenceStatus.RUNNING]:
            self._release(seq)

    def check_integrity(self) -> None:
        held = sum(len(s.draft_state.block_table) for s in self.holders.values())
        if held != self.allocator.num_used:
            raise AssertionError(f"draft pool: {self.allocator.num_used} blocks in use, sequences hold {held}")
        self.allocator.check_integrity()

    # ---- proposing ------------------------------------------------------------------------------

    def propose(self, seqs: list[Sequence], limits: list[int], step: int) -> None:
        work: list[tuple[Sequence, int]] = []
        for seq, limit in zip(seqs, limits):
            seq.draft_ids, seq.draft_probs = [], None
            if seq.draft_state is None:
                seq.draft_state = DraftState()
            state = seq.draft_state
            k = self.draft_len(state, min(limit, self.max_len - len(seq)), step, len(seqs))
            if k == 0:
                continue
            self._keep_accepted(seq, state)
            # K/V up to the last draft's predecessor: len(seq) + k - 1 positions
            if not self._reserve(seq, state, len(seq) + k - 1):
                self._release(seq)  # make room for the others; this one re-prefills later
                continue
            work.append((seq, k))
        if work:
            self._draft(work)

    def _keep_accepted(self, seq: Sequence, state: DraftState) -> None:
        """Count the last round's drafts that verification kept as computed; the rest go stale.
        The last token is always recomputed: its logits are where the next draft starts."""
        if state.drafts:
            new = seq.token_slice(state.base_len, min(len(seq), state.base_len + len(state.drafts)))
            kept = 0
            while kept < len(new) and new[kept] == state.drafts[kept]:
                kept += 1
            state.num_computed = min(state.num_computed, state.base_len + kept)
            state.drafts = []
        state.num_computed = min(state.num_computed, len(seq) - 1)

    def _draft(self, work: list[tuple[Sequence, int]]) -> None:
        """k tokens for each (seq, k): a catch-up forward, then one draft step at a time."""
        for seq, _ in work:
            state = seq.draft_state
            state.base_len = len(seq)
        drafts: list[list[int]] = [[] for _ in work]
        probs: list[list[torch.Tensor]] = [[] for _ in work]
        rows = list(range(len(work)))
        chunks = [
            SequenceChunk(seq.token_slice(s.num_computed, len(seq)), s.num_computed, s.block_table)
            for seq, s in ((seq, seq.draft_state) for seq, _ in work)
        ]
        while rows:
            logits = self._forward(chunks)
            for row, chunk, row_logits in zip(rows, chunks, logits):
                seq, _ = work[row]
                seq.draft_state.num_computed += len(chunk.token_ids)
                token, q = self._sample(seq, row_logits)
                drafts[row].append(token)
                if q is not None:
                    probs[row].append(q)
            rows = [r for r in rows if len(drafts[r]) < work[r][1]]
            chunks = [
                SequenceChunk([drafts[r][-1]], work[r][0].draft_state.num_computed, work[r][0].draft_state.block_table)
                for r in rows
            ]
        for (seq, _), tokens, qs in zip(work, drafts, probs):
            seq.draft_ids = tokens
            seq.draft_probs = torch.stack(qs) if qs else None
            seq.draft_state.drafts = list(tokens)

    def _forward(self, chunks: list[SequenceChunk]) -> torch.Tensor:
        """The draft model's logits [len(chunks), target vocab] at each chunk's last token."""
        # ForwardBatch wants one-token chunks first; map the rows back afterwards.
        order = sorted(range(len(chunks)), key=lambda i: len(chunks[i].token_ids) != 1)
        batch = ForwardBatch.build(
            [chunks[i] for i in order], self.block_size, self.model.config.sliding_window, self.model.device
        )
        self.num_forwarded_tokens += batch.num_tokens
        out = self.model(batch, self.kv)
        logits = torch.empty_like(out)
        logits[torch.tensor(order, device=out.device)] = out
        if logits.shape[1] >= self.vocab_size:
            return logits[:, : self.vocab_size]
        pad = logits.new_full((logits.shape[0], self.vocab_size - logits.shape[1]), float("-inf"))
        return torch.cat([logits, pad], dim=1)

    @staticmethod
    def _sample(seq: Sequence, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """One draft token and the q it was drawn from (None: a point mass)."""
        state = seq.sampling
        p = state.params
        if p.greedy:
            if not (p.has_penalties or p.logit_bias):
                return int(logits.argmax()), None
            return int(processed_probs(logits, state).argmax()), None  # the argmax survives any temperature
        q = processed_probs(logits, state)
        token = int(torch.multinomial(q, 1, generator=state.generator(logits.device)).item())
        return token, q
