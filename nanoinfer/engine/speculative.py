"""Speculative decoding: a cheap proposer guesses tokens, the target model checks them in one pass.

A speculating sequence's decode chunk is its pending token plus k draft tokens; the forward pass
returns logits for all k + 1 rows, and `verify` walks them in order, keeping each draft the
target would have produced and stopping at the first it would not, where it samples the
target's own token instead. Every step therefore yields between 1 and k + 1 tokens.

Lossless: greedy rows accept a draft iff it is the target's (processed) argmax; sampled rows use
the rejection rule of Leviathan et al. and Chen et al. with the proposer as a point mass q:
accept draft d with probability p(d), else sample from p with d removed and renormalized
(the residual max(0, p - q)), so every token is distributed exactly as the target samples it.
Random draws come from the sequence's own generator, so seeded requests stay reproducible.

Proposers: `NgramProposer` (prompt lookup, vLLM's "ngram": the tokens that followed the most
recent earlier occurrence of the sequence's last n tokens). Each sequence backs off by itself
when its drafts keep missing, so text that never repeats runs at plain decode speed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch

from nanoinfer.engine.sampler import Sampler, SamplingState, processed_probs
from nanoinfer.errors import NanoInferError

METHODS = ("ngram",)
_MAX_BACKOFF_STEPS = 32  # a sequence whose drafts keep missing waits at most this long to retry


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's `speculative_config` keys. Only "ngram" is built; "draft_model" is refused clearly."""

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2

    def __post_init__(self) -> None:
        if self.method == "draft_model":
            raise NanoInferError("speculative method 'draft_model' is not built yet; use 'ngram'")
        if self.method not in METHODS:
            raise NanoInferError(f"unknown speculative method {self.method!r}; expected one of {', '.join(METHODS)}")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise NanoInferError("num_speculative_tokens must be in [1, 16]")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise NanoInferError("need 1 <= prompt_lookup_min <= prompt_lookup_max")

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
        known = {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "model"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise NanoInferError(f"unknown speculative_config key(s): {', '.join(unknown)}")
        if value.get("method") == "draft_model" or "model" in value:
            raise NanoInferError("speculative method 'draft_model' is not built yet; use 'ngram'")
        return cls(**value)


@dataclass
class DraftState:
    """One sequence's proposer state: its tokens, also as bytes (searched with rfind in C), and its
    back-off. Tokens only ever grow, so each step adds just the new ones."""

    tokens: list[int] = field(default_factory=list)
    haystack: bytearray = field(default_factory=bytearray)  # 4 bytes per token, little-endian
    misses: int = 0  # drafts in a row with nothing accepted
    resume_at: int = 0  # the step from which it may propose again

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def extend(self, new_tokens: list[int]) -> None:
        self.tokens += new_tokens
        for token in new_tokens:
            self.haystack += int(token).to_bytes(4, "little")


class NgramProposer:
    """Prompt lookup: propose what followed the latest earlier occurrence of the last n tokens."""

    def __init__(self, config: SpeculativeConfig):
        self.config = config

    def propose(self, state: DraftState, new_tokens: list[int], step: int, limit: int) -> list[int]:
        """Up to min(k, limit) draft tokens, after adding the sequence's tokens since the last call."""
        state.extend(new_tokens)
        k = min(self.config.num_speculative_tokens, limit)
        if k <= 0 or step < state.resume_at:
            return []
        hay, tokens = state.haystack, state.tokens
        for n in range(min(self.config.prompt_lookup_max, len(tokens) - 1), self.config.prompt_lookup_min - 1, -1):
            needle = hay[-4 * n :]
            at = hay.rfind(needle, 0, len(hay) - 1)  # an earlier occurrence, not the suffix itself
            while at != -1 and at % 4:  # only token-aligned matches count
                at = hay.rfind(needle, 0, at + len(needle) - 1)
            if at != -1:
                start = at // 4 + n
                return tokens[start : start + k]
        return []

    @staticmethod
    def record(state: DraftState, num_draft: int, num_accepted: int, step: int) -> None:
        """Back off exponentially while drafts keep missing; any hit resets it."""
        if num_draft == 0:
            return
        if num_accepted:
            state.misses = 0
            return
        state.misses += 1
        state.resume_at = step + min(2**state.misses, _MAX_BACKOFF_STEPS)


def verify_token(sampler: Sampler, logits: torch.Tensor, state: SamplingState, draft: int | None) -> int:
    """The target's token for one position, given a draft there (None: the bonus position).

    Returns the draft itself when it is accepted, else the token sampled in its place."""
    if draft is None:
        return sampler.sample(logits[None], [state]).token_ids[0]
    if state.params.greedy:  # argmax after penalties and bias: kept iff it is the draft
        return sampler.sample(logits[None], [state]).token_ids[0]
    probs = processed_probs(logits, state)
    generator = state.generator(logits.device)
    if torch.rand((), generator=generator, device=logits.device).item() < probs[draft].item():
        return draft
    residual = probs.clone()
    residual[draft] = 0.0
    if residual.sum() <= 0:  # p was a point mass on the draft: rejection has probability 0
        return draft
    return int(torch.multinomial(residual / residual.sum(), 1, generator=generator).item())
