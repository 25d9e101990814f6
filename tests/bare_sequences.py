"""Sequences built as LLMEngine._new_sequence builds them, without a model or tokenizer, for the
scheduler and KV-manager tests (which never detokenize)."""

from __future__ import annotations

from nanoinfer.engine.sampler import SamplingState
from nanoinfer.engine.sequence import Sequence
from nanoinfer.engine.stop import StopChecker
from nanoinfer.sampling_params import SamplingParams
from nanoinfer.tokenizer import IncrementalDetokenizer


def bare_sequence(request_id: str, prompt: list[int], max_tokens: int = 64, salt: str | None = None) -> Sequence:
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    return Sequence(
        request_id=request_id,
        index=0,
        prompt_ids=list(prompt),
        params=params,
        sampling=SamplingState(params, prompt, 0),
        detokenizer=IncrementalDetokenizer(None),  # type: ignore[arg-type]
        stop_checker=StopChecker([], False),
        cache_salt=salt,
    )
