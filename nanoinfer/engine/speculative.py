"""Speculative decoding: a cheap proposer guesses tokens, the target model checks them in one pass.

A speculating sequence's decode chunk is its pending token plus k draft tokens; the forward pass
returns logits for all k + 1 rows, and `verify_token` walks them in order, keeping each draft the
target would have produced and stopping at the first it would not, where it samples the
target's own token instead. Every step therefore yields between 1 and k + 1 tokens.

Lossless: greedy rows accept a draft iff it is the target's (processed) argmax; sampled rows use
the rejection rule of Leviathan et al. and Chen et al.: accept draft d with probability
min(1, p(d) / q(d)), else sample from the normalized residual max(0, p - q), where q is the
distribution the draft was drawn from (a point mass for the n-gram proposer and for greedy
drafts), so every token is distributed exactly as the target samples it. Random draws come from
the sequence's own generator, so seeded requests stay reproducible.

Proposers: `NgramProposer` (prompt lookup, vLLM's "ngram": the tokens that followed the most
recent earlier occurrence of the sequence's last n tokens) and `DraftModelProposer`
(engine/draft_model.py: a smaller or cheaper model with its own paged KV cache). Each sequence's
draft length follows its acceptance, and it pauses by itself when its drafts keep missing, so
text that never repeats runs at plain decode speed.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from nanoinfer.engine.sampler import Sampler, SamplingState, processed_probs
from nanoinfer.errors import NanoInferError

if TYPE_CHECKING:
    from nanoinfer.engine.sequence import Sequence

METHODS = ("ngram", "draft_model")
QUANTIZATIONS = ("none", "int8", "int4")  # nanoinfer.quant.METHODS (not imported: this module stays light)
_KEYS = ("method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "model", "quantization")
_MAX_BACKOFF_STEPS = 32  # a sequence whose drafts keep missing waits at most this long to retry
# A one-row decode step costs about this many extra rows' compute (streaming the weights once):
# measured for SmolLM2's int4 decode stack, 4.3 ms for 1 or 2 rows and +0.66 ms per row past that
# on 256-bit kernels; 2.87 ms and +0.42 ms (6.8) on 512-bit ones (docs/performance.md,
# "Speculative decoding").
ROW_COST_RATIO = 6.5
# How often the target keeps the first token after an n-gram match shorter than
# prompt_lookup_max: 0.05-0.47 on the bench's workloads at batch 16 (one small exception: 13 of
# 14 free-form probes after 3-grams), against 0.86-1.0 after a match of full length
# (docs/performance.md, "Match length, and the settings measured in lockstep"). So a short match
# counts as a chance of at most this much, whatever the sequence's recent rate.
SHORT_MATCH_RATE = 0.4
_RATE_DECAY = 0.5  # weight of the older drafts in a sequence's acceptance rate, per draft


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's `speculative_config` keys."""

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4  # ngram: the longest suffix looked up
    prompt_lookup_min: int = 2
    model: str | None = None  # draft_model: a built-in name, HF directory or .gguf file
    quantization: str | None = None  # draft_model: its weight format (None: its package's default)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise NanoInferError(f"unknown speculative method {self.method!r}; expected one of {', '.join(METHODS)}")
        if not isinstance(self.num_speculative_tokens, int) or not 1 <= self.num_speculative_tokens <= 16:
            raise NanoInferError("num_speculative_tokens must be an integer in [1, 16]")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise NanoInferError("need 1 <= prompt_lookup_min <= prompt_lookup_max")
        if self.method == "draft_model" and not self.model:
            raise NanoInferError("speculative method 'draft_model' needs a 'model': a built-in name, HF dir or .gguf")
        if self.method != "draft_model" and (self.model is not None or self.quantization is not None):
            raise NanoInferError("speculative_config 'model' and 'quantization' are for method 'draft_model'")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise NanoInferError(
                f"unknown draft quantization {self.quantization!r}; expected one of {', '.join(QUANTIZATIONS)}"
            )

    @classmethod
    def parse(cls, value: SpeculativeConfig | dict[str, Any] | str | None) -> SpeculativeConfig | None:
        """From a dict, a JSON string (the CLI's --speculative-config) or None."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise NanoInferError(f"--speculative-config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise NanoInferError("speculative_config must be a JSON object")
        unknown = sorted(set(value) - set(_KEYS))
        if unknown:
            raise NanoInferError(f"unknown speculative_config key(s): {', '.join(unknown)}")
        if "model" in value and "method" not in value:  # as vLLM: a model alone means a draft model
            value = {**value, "method": "draft_model"}
        return cls(**value)


@dataclass
class DraftState:
    """One sequence's proposer state: how long its next draft may be and its back-off, plus what
    each proposer keeps (the n-gram lookup's tokens; the draft model's KV blocks)."""

    misses: int = 0  # drafts in a row with nothing accepted
    resume_at: int = 0  # the step from which it may propose again
    # Recent draft positions kept and tried (decaying sums, a prior of one in two): their ratio
    # estimates the chance that the target keeps a draft token given it kept the one before.
    hits: float = 1.0
    trials: float = 2.0
    probe_at: int = 0  # while drafts are not worth their rows: the step of the next one-token probe
    # ngram: the sequence's tokens, also as bytes (searched with rfind in C); they only ever grow,
    # so each step adds just the new ones
    tokens: list[int] = field(default_factory=list)
    haystack: bytearray = field(default_factory=bytearray)  # 4 bytes per token, little-endian
    # draft_model: its KV blocks, how many leading tokens they hold, and the last draft
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    base_len: int = 0  # the sequence's length when the last draft was made
    drafts: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def extend(self, new_tokens: list[int]) -> None:
        self.tokens += new_tokens
        for token in new_tokens:
            self.haystack += int(token).to_bytes(4, "little")


class Proposer(ABC):
    """What every proposer shares: per-sequence state, draft length and back-off."""

    def __init__(self, config: SpeculativeConfig):
        self.config = config

    @abstractmethod
    def propose(self, seqs: list[Sequence], limits: list[int], step: int) -> None:
        """Set each sequence's `draft_ids` (and `draft_probs`, the q each was drawn from, or None
        for point masses), at most `limits[i]` tokens for seqs[i]."""

    def release_idle(self) -> None:  # noqa: B027 - most proposers hold no memory
        """Free what sequences that stopped running hold (a draft model's KV blocks)."""

    def check_integrity(self) -> None:  # noqa: B027
        """Raise AssertionError unless the proposer's own memory is accounted for."""

    def draft_len(self, state: DraftState, limit: int, step: int, batch: int = 1) -> int:
        """How many tokens a sequence may draft this step, in a batch of `batch` decoding sequences
        (0 while it backs off).

        Draft position j is kept with probability about rate ** j (rate: the sequence's recent
        per-position acceptance), and it costs the target one more row. At batch 1 a row is cheap
        next to streaming the weights; in a large batch the matmuls are compute-bound and a row
        costs almost what a plain decode token does. A position is drafted while its chance beats
        batch / (batch + ROW_COST_RATIO): about 1/7 alone, 3/4 at batch 16. When not even the
        first position is worth it, a one-token probe every 2 x batch steps keeps the rate current
        (so a sequence that starts repeating its input is noticed) at a bounded cost. A proposer
        may send fewer tokens than this once it sees its guess (NgramProposer: short matches)."""
        if step < state.resume_at:
            return 0
        k = max(0, min(self.config.num_speculative_tokens, limit))
        rate, threshold = state.hits / state.trials, break_even(batch)
        if rate < threshold:  # not worth a row: only probe now and then, so the rate can recover
            if step < state.probe_at:
                return 0
            state.probe_at = step + 2 * batch
            return min(k, 1)
        return positions_worth(rate, k, threshold)

    def record(self, state: DraftState, num_draft: int, num_accepted: int, step: int) -> None:
        """Update the sequence's acceptance rate; back off while drafts keep missing.

        A draft with nothing accepted pauses proposing, exponentially longer while misses
        continue (so text that never repeats costs nothing); any hit resets that."""
        if num_draft == 0:
            return
        tried = num_accepted + (num_accepted < num_draft)  # positions after a rejection were never tried
        state.hits = _RATE_DECAY * state.hits + num_accepted
        state.trials = _RATE_DECAY * state.trials + tried
        if num_accepted:
            state.misses = 0
            return
        state.misses += 1
        state.resume_at = step + min(2**state.misses, _MAX_BACKOFF_STEPS)


def break_even(batch: int) -> float:
    """The chance of being kept above which a draft position is worth its row in a batch of
    `batch` decoding sequences (Proposer.draft_len)."""
    return batch / (batch + ROW_COST_RATIO)


def positions_worth(rate: float, k: int, threshold: float) -> int:
    """How many of k draft positions to send when position j is kept with chance rate ** j:
    those whose chance is at least `threshold`."""
    n, chance = 0, rate
    while n < k and chance >= threshold:
        n, chance = n + 1, chance * rate
    return n


class NgramProposer(Proposer):
    """Prompt lookup: propose what followed the latest earlier occurrence of the last n tokens."""

    def propose(self, seqs: list[Sequence], limits: list[int], step: int) -> None:
        threshold = break_even(len(seqs))  # for short matches
        for seq, limit in zip(seqs, limits):
            if seq.draft_state is None:
                seq.draft_state = DraftState()
            state = seq.draft_state
            k = self.draft_len(state, limit, step, len(seqs))
            seq.draft_probs = None
            if not k:  # backing off (most of a batch on text that does not repeat): only the check
                seq.draft_ids = []  # above; the new tokens join the haystack at the next lookup
                continue
            drafts, match_len = self.lookup(state, seq.token_slice(state.num_tokens, len(seq)), k)
            if match_len < self.config.prompt_lookup_max:  # a weaker guess, even for a probe
                drafts = drafts[: positions_worth(min(state.hits / state.trials, SHORT_MATCH_RATE), k, threshold)]
            seq.draft_ids = drafts

    def lookup(self, state: DraftState, new_tokens: list[int], k: int) -> tuple[list[int], int]:
        """Up to k draft tokens and the length of the n-gram they follow (0: no match), after
        adding the sequence's tokens since the last call."""
        state.extend(new_tokens)
        if k <= 0:
            return [], 0
        hay, tokens = state.haystack, state.tokens
        for n in range(min(self.config.prompt_lookup_max, len(tokens) - 1), self.config.prompt_lookup_min - 1, -1):
            needle = hay[-4 * n :]
            at = hay.rfind(needle, 0, len(hay) - 1)  # an earlier occurrence, not the suffix itself
            while at != -1 and at % 4:  # only token-aligned matches count
                at = hay.rfind(needle, 0, at + len(needle) - 1)
            if at != -1:
                start = at // 4 + n
                return tokens[start : start + k], n
        return [], 0


def verify_token(
    sampler: Sampler, logits: torch.Tensor, state: SamplingState, draft: int | None, q: torch.Tensor | None = None
) -> int:
    """The target's token for one position, given a draft there (None: the bonus position) and
    the distribution q [V] it was drawn from (None: a point mass on it).

    Returns the draft itself when it is accepted, else the token sampled in its place."""
    if draft is None or state.params.greedy:  # greedy: argmax after penalties and bias, kept iff the draft
        return sampler.sample(logits[None], [state]).token_ids[0]
    p = processed_probs(logits, state)
    generator = state.generator(logits.device)
    q_draft = 1.0 if q is None else float(q[draft])
    if torch.rand((), generator=generator, device=logits.device).item() * q_draft < p[draft].item():
        return draft  # u < p(d) / q(d), without dividing by a q(d) that may be tiny
    if q is None:
        residual = p.clone()
        residual[draft] = 0.0
    else:
        residual = (p - q[: p.shape[0]]).clamp_min_(0.0)
    if residual.sum() <= 0:  # p <= q everywhere means p == q: rejection had probability 0
        return draft
    return int(torch.multinomial(residual / residual.sum(), 1, generator=generator).item())
