"""Batched token sampling with per-row parameters and per-request random generators.

Order of operations on each row of logits [B, V] (computed in float32):
  1. repetition penalty (HF: tokens in prompt + output; positive logits / p, negative * p)
  2. presence / frequency penalties (OpenAI: output tokens only; logit -= f * count + p * [count > 0])
  3. logit_bias (added)
  4. greedy rows: argmax. Sampled rows: temperature, top-k, top-p, min-p, then one random draw.

Logprobs are computed from log_softmax of the RAW model logits, before penalties, bias and
temperature (vLLM's default), so they describe the model, not the sampling distribution.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from nanoinfer.sampling_params import GREEDY_EPS, SamplingParams

if TYPE_CHECKING:
    from nanoinfer.engine.structured import GrammarState

# Exponential noise can be exactly 0; dividing by it would turn masked (p = 0) tokens into NaN.
_TINY = torch.finfo(torch.float32).tiny


def _derive_seed(seed: int | None, index: int) -> int:
    """Seed of choice `index` of a request: the request's seed itself for choice 0."""
    if seed is None:
        return secrets.randbits(63)  # unseeded requests must differ between runs
    if index == 0:
        return seed % 2**64
    # Distinct, fixed streams for the other choices of an n > 1 request.
    return (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9) % 2**64


class SamplingState:
    """One sequence's sampling state: params, its own random generator, and token history.

    The engine appends each emitted token to `output_ids` (the sampler never does); penalty
    statistics are cached and updated incrementally from that list.
    """

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int] = (), index: int = 0) -> None:
        self.params = params
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.seed = _derive_seed(params.seed, index)
        self._generator: torch.Generator | None = None
        self._seen: torch.Tensor | None = None  # bool [V]: token occurs in prompt or output
        self._counts: torch.Tensor | None = None  # float [V]: occurrences in output
        self._counted = 0  # how many of output_ids are in _seen/_counts
        self._bias: tuple[torch.Tensor, torch.Tensor] | None = None  # logit_bias as (ids, values)
        self._bias_key: tuple[int, torch.device] | None = None  # (vocab size, device) _bias was built for
        self.grammar: GrammarState | None = None  # structured outputs: masks this sequence's logits

    def generator(self, device: torch.device) -> torch.Generator:
        """This sequence's generator on `device`, created (and seeded) on first use."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        return self._generator

    def penalty_stats(self, vocab_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(seen mask over prompt+output, output counts), both [vocab_size], kept in sync with output_ids."""
        stale = (
            self._seen is None
            or self._seen.device != device
            or self._seen.numel() != vocab_size
            or len(self.output_ids) < self._counted  # history was rewritten: rebuild
        )
        if stale:
            self._seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self._counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
            if self.prompt_ids:
                self._seen[torch.tensor(self.prompt_ids, dtype=torch.long, device=device)] = True
            self._counted = 0
        assert self._seen is not None and self._counts is not None
        new = self.output_ids[self._counted :]
        if new:
            ids = torch.tensor(new, dtype=torch.long, device=device)
            self._counts.index_add_(0, ids, torch.ones(len(new), device=device))  # repeats add up
            self._seen[ids] = True
            self._counted = len(self.output_ids)
        return self._seen, self._counts

    def logit_bias_tensors(self, vocab_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """params.logit_bias as (token ids, float32 values) on `device`, built once per sequence."""
        # The dict is fixed for the request's lifetime; rebuilding it every step cost a Python
        # loop over every biased token of every row.
        if self._bias is None or self._bias_key != (vocab_size, device):
            self._bias = _bias_tensors(self.params.logit_bias or {}, vocab_size, device)
            self._bias_key = (vocab_size, device)
        assert self._bias is not None
        return self._bias


def _bias_tensors(bias: dict[int, float], vocab_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Out-of-range ids are rejected earlier by check_vocab; skip them here all the same.
    kept = {t: b for t, b in bias.items() if t < vocab_size}
    ids = torch.tensor(list(kept), dtype=torch.long, device=device)
    return ids, torch.tensor(list(kept.values()), dtype=torch.float32, device=device)


@dataclass
class SampleOutput:
    """Chosen token per row, and per row a {token id: logprob} dict or None when not requested."""

    token_ids: list[int]
    logprobs: list[dict[int, float] | None]


class Sampler:
    """Chooses one token per row of a logits batch; stateless, all state lives in SamplingState."""

    def sample(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> SampleOutput:
        """Pick the next token for each row of `logits` [B, V] under that row's state."""
        batch, vocab = logits.shape
        if len(states) != batch:
            raise ValueError(f"got {batch} rows of logits but {len(states)} sampling states")
        params = [s.params for s in states]
        constrained = [i for i, s in enumerate(states) if s.grammar is not None]
        if constrained:  # masked before everything else: logprobs too are of the constrained distribution
            logits = logits.clone()
            for i in constrained:
                grammar = states[i].grammar
                assert grammar is not None
                grammar.mask_(logits[i])
        needs_processing = any(p.has_penalties or p.logit_bias or not p.greedy for p in params)
        if not needs_processing:  # all plain greedy: skip the float copy
            tokens = logits.argmax(dim=-1)
        else:
            x = logits.to(torch.float32, copy=True)  # never modify the caller's tensor
            self._apply_penalties(x, states)
            self._apply_logit_bias(x, states)
            tokens = self._choose(x, states)
        token_ids = tokens.tolist()
        return SampleOutput(token_ids, self._logprobs(logits, params, tokens, token_ids))

    @staticmethod
    def _apply_penalties(x: torch.Tensor, states: Sequence[SamplingState]) -> None:
        rows = [i for i, s in enumerate(states) if s.params.has_penalties]
        if not rows:
            return
        device, vocab = x.device, x.shape[1]
        stats = [states[i].penalty_stats(vocab, device) for i in rows]
        seen = torch.stack([s for s, _ in stats])
        counts = torch.stack([c for _, c in stats])
        ps = [states[i].params for i in rows]

        def column(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)

        idx = torch.tensor(rows, dtype=torch.long, device=device)
        sub = x[idx]
        rep = column([p.repetition_penalty for p in ps])
        penalized = torch.where(sub > 0, sub / rep, sub * rep)
        sub = torch.where(seen, penalized, sub)
        sub -= counts * column([p.frequency_penalty for p in ps])
        sub -= (counts > 0).float() * column([p.presence_penalty for p in ps])
        x[idx] = sub

    @staticmethod
    def _apply_logit_bias(x: torch.Tensor, rows: Sequence[SamplingState | SamplingParams]) -> None:
        """Add each row's logit_bias in place (cached tensors for states, built afresh for bare params)."""
        vocab, device = x.shape[1], x.device
        biased: list[tuple[int, tuple[torch.Tensor, torch.Tensor]]] = []
        for i, r in enumerate(rows):
            if isinstance(r, SamplingState):
                if r.params.logit_bias:
                    biased.append((i, r.logit_bias_tensors(vocab, device)))
            elif r.logit_bias:
                biased.append((i, _bias_tensors(r.logit_bias, vocab, device)))
        if not biased:
            return
        ids = torch.cat([b[0] for _, b in biased])
        values = torch.cat([b[1] for _, b in biased]).to(x.dtype)
        # Row of each entry; output_size keeps repeat_interleave from syncing with the device.
        row_ids = torch.repeat_interleave(
            torch.tensor([i for i, _ in biased], device=device),
            torch.tensor([b[0].numel() for _, b in biased], device=device),
            output_size=ids.numel(),
        )
        x.index_put_((row_ids, ids), values, accumulate=True)

    def _choose(self, x: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
        """Argmax for greedy rows; filtered random draw for the others."""
        tokens = x.argmax(dim=-1)  # cheap next to the rest, and already right for greedy rows
        rows = [i for i, s in enumerate(states) if not s.params.greedy]
        if not rows:
            return tokens
        device = x.device
        idx = torch.tensor(rows, dtype=torch.long, device=device)
        ps = [states[i].params for i in rows]
        temps = torch.tensor([p.temperature for p in ps], dtype=torch.float32, device=device)
        sub = x[idx] / temps.unsqueeze(1)
        _filter_top_k_top_p_min_p(sub, ps)
        probs = torch.softmax(sub, dim=-1)
        # Exponential race: argmax(p / E), E ~ Exp(1), draws token i with probability p_i.
        # Each row's noise comes from its own generator, and always V draws per step, so a
        # seeded request's tokens do not depend on its batch neighbours or its row position.
        noise = torch.stack(
            [
                torch.empty(x.shape[1], dtype=torch.float32, device=device).exponential_(
                    generator=states[i].generator(device)
                )
                for i in rows
            ]
        )
        tokens[idx] = (probs / noise.clamp_min_(_TINY)).argmax(dim=-1)
        return tokens

    @staticmethod
    def _logprobs(
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        tokens: torch.Tensor,
        token_ids: list[int],
    ) -> list[dict[int, float] | None]:
        out: list[dict[int, float] | None] = [None] * len(params)
        rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not rows:
            return out
        idx = torch.tensor(rows, dtype=torch.long, device=logits.device)
        lp = torch.log_softmax(logits[idx].float(), dim=-1)
        chosen = lp.gather(1, tokens[idx].unsqueeze(1)).squeeze(1).tolist()
        k = min(max(params[i].logprobs or 0 for i in rows), lp.shape[1])
        top_vals, top_ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
        top_values, top_tokens = top_vals.tolist(), top_ids.tolist()
        for j, i in enumerate(rows):
            n = params[i].logprobs or 0
            entry = {token_ids[i]: chosen[j]}  # the chosen token first, then the top n by rank
            for token, value in zip(top_tokens[j][:n], top_values[j][:n]):
                entry.setdefault(token, value)
            out[i] = entry
        return out


def processed_probs(logits: torch.Tensor, state: SamplingState) -> torch.Tensor:
    """The distribution a sampled row draws from (penalties, logit bias, temperature, top-k/p,
    min-p), for one row of logits [V]: what speculative verification accepts drafts against."""
    x = logits.to(torch.float32, copy=True).unsqueeze(0)
    Sampler._apply_penalties(x, [state])
    Sampler._apply_logit_bias(x, [state])
    x /= max(state.params.temperature, GREEDY_EPS)
    _filter_top_k_top_p_min_p(x, [state.params])
    return torch.softmax(x, dim=-1)[0]


def row_logprobs(logits: torch.Tensor, params: SamplingParams, token: int) -> dict[int, float] | None:
    """Logprobs of one chosen token and its top alternatives, from one raw row [V] (None if not asked)."""
    return Sampler._logprobs(logits.unsqueeze(0), [params], torch.tensor([token], device=logits.device), [token])[0]


# Top-k / top-p take their candidates from a partial sort (torch.topk) of this many logits at
# least, and fall back to sorting the whole vocabulary only when a row's nucleus is wider: a full
# sort of a 49,152-token row took ~3 ms a token on CPU, most of a sampled decode step.
CANDIDATES = 512


def _filter_top_k_top_p_min_p(logits: torch.Tensor, params: Sequence[SamplingParams]) -> None:
    """In place, set to -inf every logit that top-k, then top-p, then min-p drops (per row)."""
    vocab = logits.shape[1]
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    limited = [k < vocab or p.top_p < 1.0 for k, p in zip(ks, params)]
    use_min_p = any(p.min_p > 0.0 for p in params)
    if not (any(limited) or use_min_p):
        return
    device = logits.device
    if use_min_p:
        # Relative to the top token, so it reads the same on the full or the top-k/top-p-filtered
        # distribution: the top token survives both filters.
        probs = torch.softmax(logits, dim=-1)
        min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device)
        below = probs < min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    if any(limited):
        drop = _top_k_top_p_drops(logits, ks, params, limited)
        if use_min_p:
            drop |= below
        logits.masked_fill_(drop, float("-inf"))
    else:
        logits.masked_fill_(below, float("-inf"))


def _top_k_top_p_drops(
    logits: torch.Tensor, ks: list[int], params: Sequence[SamplingParams], limited: list[bool]
) -> torch.Tensor:
    """[batch, vocab] True where top-k, then top-p (over the top-k survivors renormalized), drop a
    token; rows not `limited` (neither asked) drop none. Candidates from a partial sort when every
    limited row's nucleus fits in it, else a full sort."""
    vocab = logits.shape[1]
    device = logits.device
    unlimited = torch.tensor([not lim for lim in limited], device=device)
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
    k_of_row = torch.tensor(ks, device=device).unsqueeze(1)
    has_k = k_of_row < vocab  # its top-k survivors are all among the candidates (count >= k)
    whole = torch.logsumexp(logits, dim=-1, keepdim=True)  # the normalizer of rows without top-k
    count = min(vocab, max(CANDIDATES, max((k for k in ks if k < vocab), default=0)))
    while True:
        sorted_logits, order = logits.topk(count, dim=-1)
        k_drop = torch.arange(count, device=device).unsqueeze(0) >= k_of_row
        within = torch.logsumexp(sorted_logits.masked_fill(k_drop, float("-inf")), dim=-1, keepdim=True)
        probs = torch.exp(sorted_logits - torch.where(has_k, within, whole)).masked_fill(k_drop, 0.0)
        # Mass strictly before each token; keep while it is below top_p. The first token has mass
        # 0 < top_p, so it always survives, and the kept set is the smallest with mass >= top_p.
        cumulative = torch.cumsum(probs, dim=-1)
        covered = unlimited | has_k.squeeze(1) | (cumulative[:, -1] >= top_p)
        if count == vocab or bool(covered.all()):
            break
        count = vocab  # some row's nucleus is wider than the candidates
    mass_before = torch.nn.functional.pad(cumulative[:, :-1], (1, 0))
    kept = ~(k_drop | (mass_before >= top_p.unsqueeze(1)))
    drop = torch.ones_like(logits, dtype=torch.bool).scatter_(1, order, ~kept)
    return drop & ~unlimited.unsqueeze(1)
