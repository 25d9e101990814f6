"""Sequence: one stream of tokens being generated, and the state the scheduler keeps for it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from nanoinfer.engine.sampler import SamplingState
from nanoinfer.engine.stop import StopChecker
from nanoinfer.sampling_params import SamplingParams
from nanoinfer.tokenizer import IncrementalDetokenizer


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # a sequence is an identity, not a value: `in`, `remove` and dict keys use `is`
class Sequence:
    """Tokens, KV addressing and output state of one generated sequence.

    KV invariant: the cache holds K/V for `token_ids[:num_computed]`; the scheduler's job each step
    is to compute `token_ids[num_computed:]` (one token when decoding, many when prefilling).
    `block_table` and `prefix_node` are set only by the KVCacheManager, which also sets
    `num_computed` when it admits or frees the sequence; the scheduler advances it as chunks run.
    """

    request_id: str
    index: int  # choice index within its request (n > 1)
    prompt_ids: list[int]
    params: SamplingParams
    sampling: SamplingState
    detokenizer: IncrementalDetokenizer
    stop_checker: StopChecker
    arrival_time: float = field(default_factory=time.monotonic)
    status: SequenceStatus = SequenceStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    prefix_node: Any = None  # radix node this sequence holds a lock on
    num_cached_prompt: int = 0  # prompt tokens served by the prefix cache (usage.cached_tokens)
    text: str = ""  # detokenized output, stop string already cut
    num_streamed_chars: int = 0
    num_sent_tokens: int = 0  # output tokens already handed out (for delta outputs)
    finish_sent: bool = False  # the finish reason was handed out (DELTA sends it once)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_forks_pending: int = 0  # n > 1: siblings to fork off once the prompt is computed
    # Prefix-cache namespace: only sequences with the same salt share cached prefixes (None: the shared one).
    cache_salt: str | None = None
    draft_ids: list[int] = field(default_factory=list)  # speculative guesses for this step (not yet tokens)
    draft_probs: Any = None  # torch.Tensor [len(draft_ids), vocab]: the q each draft was drawn from; None: point masses
    draft_state: Any = None  # the proposer's per-sequence state (speculative.DraftState)
    lora_id: int = 0  # the LoRA adapter's lora_int_id; 0: the base model

    @property
    def token_ids(self) -> list[int]:
        """Prompt and output as one new list (O(length): use `token_slice` for a part)."""
        return self.prompt_ids + self.output_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """`token_ids[start:end]` for 0 <= start <= end <= len(self), copying only that part
        (a decode step asks for one token of a sequence thousands long)."""
        split = len(self.prompt_ids)
        if end <= split:
            return self.prompt_ids[start:end]
        if start >= split:
            return self.output_ids[start - split : end - split]
        return self.prompt_ids[start:] + self.output_ids[: end - split]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        """Tokens whose K/V still has to be computed before the next token can be sampled."""
        return len(self) - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.output_ids.append(token_id)
        self.sampling.output_ids.append(token_id)
