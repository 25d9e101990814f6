"""Speculative decoding (n-gram proposer) on tiny random models: lossless, inside the engine."""

from __future__ import annotations

import random

import pytest
from tiny_models import CASE_IDS

from nanoinfer import LLM, SamplingParams
from nanoinfer.engine.speculative import DraftState, NgramProposer, SpeculativeConfig
from nanoinfer.errors import NanoInferError

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


def _prompts() -> list[list[int]]:
    rng = random.Random(20)
    phrase = [rng.randrange(3, 300) for _ in range(12)]
    repetitive = phrase * 3 + phrase[:5]  # guesses from the prompt are often right
    free = [rng.randrange(3, 300) for _ in range(30)]  # and here seldom
    return [repetitive, free]


def _accepted(llm: LLM) -> float:
    value = llm.engine.metrics.registry.get_sample_value("nanoinfer:spec_decode_num_accepted_tokens_total")
    return value or 0.0


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_greedy_outputs_are_identical_with_speculation(tiny_model, case_id):
    directory, _ = tiny_model(case_id)
    plain = LLM(str(directory))
    spec = LLM(str(directory), speculative_config=SPEC)
    prompts = _prompts()
    expected = [o.token_ids for o in plain.generate(prompts, GREEDY)]
    assert [o.token_ids for o in spec.generate(prompts, GREEDY)] == expected  # batched together
    assert [spec.generate([p], GREEDY)[0].token_ids for p in prompts] == expected  # alone
    assert _accepted(spec) > 0, "no draft was ever accepted: the test would not exercise verification"
    spec.engine.check_integrity()
    assert not spec.engine.has_unfinished_requests()


def test_limits_inside_an_accepted_run(tiny_model):
    directory, _ = tiny_model("llama")
    plain, spec = LLM(str(directory)), LLM(str(directory), speculative_config=SPEC)
    prompt = _prompts()[0]
    for max_tokens in (1, 2, 5, 7, 13):
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=2)
        ours, theirs = spec.generate([prompt], params)[0], plain.generate([prompt], params)[0]
        assert ours.token_ids == theirs.token_ids and len(ours.token_ids) == max_tokens
        assert [set(e) for e in ours.logprobs] == [set(e) for e in theirs.logprobs]
        for a, b in zip(ours.logprobs, theirs.logprobs):
            assert all(abs(a[t] - b[t]) < 1e-4 for t in a)
    free = plain.generate([prompt], GREEDY)[0].token_ids
    stop = free[9]
    params = SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop])
    assert spec.generate([prompt], params)[0].token_ids == plain.generate([prompt], params)[0].token_ids
    spec.engine.check_integrity()


def test_seeded_sampling_is_reproducible_with_speculation(tiny_model):
    directory, _ = tiny_model("llama")
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=30, seed=7, ignore_eos=True, n=2)
    first = LLM(str(directory), speculative_config=SPEC).generate(_prompts(), params)
    again = LLM(str(directory), speculative_config=SPEC).generate(_prompts(), params)
    assert [[c.token_ids for c in o.outputs] for o in first] == [[c.token_ids for c in o.outputs] for o in again]


def test_ngram_proposer_and_backoff():
    proposer = NgramProposer(SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_max=3, prompt_lookup_min=2))
    state = DraftState()
    tokens = [1, 2, 3, 4, 5, 9, 1, 2, 3]
    assert proposer.propose(state, tokens, step=1, limit=10) == [4, 5, 9]  # after the earlier [1, 2, 3]
    assert proposer.propose(state, [], step=1, limit=2) == [4, 5]  # nothing new since
    assert proposer.propose(DraftState(), [7, 8, 9, 10], step=1, limit=10) == []
    assert proposer.propose(DraftState(), [256, 1, 256, 1], step=1, limit=10) == [256, 1]  # token-aligned
    proposer.record(state, 3, 0, step=1)  # a miss: wait 2 steps
    assert proposer.propose(state, [], step=2, limit=10) == []
    assert proposer.propose(state, [], step=3, limit=10) == [4, 5, 9]
    assert proposer.propose(state, [4], step=3, limit=10) == [5, 9, 1]  # a new token moves the lookup
    proposer.record(state, 3, 1, step=3)
    assert state.misses == 0


def test_bad_speculative_configs_are_refused(tiny_model):
    directory, _ = tiny_model("llama")
    for bad in (
        {"method": "eagle"},
        {"method": "ngram", "num_speculative_tokens": 0},
        {"bogus": 1},
        {"method": "draft_model", "model": "x"},
        "not json",
    ):
        with pytest.raises(NanoInferError):
            LLM(str(directory), speculative_config=bad)


def _chi_square_critical(df: int, z: float = 3.09) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z = 3.09: alpha = 0.001)."""
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


def test_sampled_tokens_keep_the_target_distribution(tiny_model):
    """Rejection sampling against the n-gram point mass keeps the target's distribution.

    2,000 samples of the first four tokens (top_k 3, at most 81 outcomes) with and without
    speculation; a two-sample chi-square test at alpha = 0.001 must not tell them apart. Power:
    with 2,000 per arm, moving 6 points of probability between two outcomes of ~20% each gives a
    statistic around 30 on one degree of freedom, rejected with probability > 0.9; a broken rule
    (e.g. accepting every draft) shifts whole outcomes and is rejected with certainty."""
    directory, _ = tiny_model("llama")
    # The model's own greedy continuation in the prompt: lookups then find drafts it often agrees with.
    prompt = _prompts()[0] + LLM(str(directory)).generate([_prompts()[0]], GREEDY)[0].token_ids
    params = SamplingParams(temperature=1.0, top_k=3, max_tokens=4, ignore_eos=True)
    counts = []
    for config in (None, SPEC):
        llm = LLM(str(directory), speculative_config=config, max_num_seqs=256)
        outs = llm.generate([prompt] * 2000, params)
        tally: dict[tuple[int, ...], int] = {}
        for o in outs:
            tally[tuple(o.token_ids)] = tally.get(tuple(o.token_ids), 0) + 1
        counts.append(tally)
        if config is not None:
            assert (
                0
                < _accepted(llm)
                < llm.engine.metrics.registry.get_sample_value("nanoinfer:spec_decode_num_draft_tokens_total")
            ), "the test needs both accepted and rejected drafts"
    outcomes = sorted(set(counts[0]) | set(counts[1]))
    # Pool the rare outcomes so every expected count is at least 5.
    common = [o for o in outcomes if counts[0].get(o, 0) + counts[1].get(o, 0) >= 20]
    rows = [[c.get(o, 0) for o in common] + [sum(v for k, v in c.items() if k not in common)] for c in counts]
    totals = [sum(r) for r in rows]
    columns = [a + b for a, b in zip(*rows)]
    stat = sum(
        (rows[i][j] - totals[i] * columns[j] / sum(totals)) ** 2 / (totals[i] * columns[j] / sum(totals))
        for i in range(2)
        for j in range(len(columns))
        if columns[j]
    )
    df = sum(1 for c in columns if c) - 1
    assert df >= 2, "too few outcomes for the test to mean anything"
    assert stat < _chi_square_critical(df), f"chi-square {stat:.1f} on {df} degrees of freedom"


def test_preemption_abort_and_n_while_speculating(tiny_model):
    """A small KV pool forces preemptions mid-speculation; n = 3 forks; aborts free everything."""
    directory, _ = tiny_model("llama")
    prompts = [_prompts()[0][i:] for i in range(0, 24, 3)]
    plain = LLM(str(directory), kv_cache_memory=_small_pool(directory), block_size=16)
    spec = LLM(str(directory), kv_cache_memory=_small_pool(directory), block_size=16, speculative_config=SPEC)
    expected = [o.token_ids for o in plain.generate(prompts, GREEDY)]
    assert [o.token_ids for o in spec.generate(prompts, GREEDY)] == expected
    assert spec.engine.scheduler.num_preemptions > 0, "the pool was large enough: nothing was preempted"
    forked = spec.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, n=3))[0]
    assert [c.token_ids for c in forked.outputs] == [expected[0][:20]] * 3
    spec.engine.add_request("gone", prompts[1], GREEDY)
    for _ in range(4):
        spec.engine.step()
    spec.engine.abort("gone")
    assert not spec.engine.has_unfinished_requests()
    spec.engine.check_integrity()
    assert spec.engine.kv_manager.usage().in_use == 0


def _small_pool(directory) -> int:
    """Bytes for 8 blocks of 16 tokens: too few for 8 sequences of ~80 tokens at once."""
    from nanoinfer.loading import load_package
    from nanoinfer.model.kv_cache import kv_bytes_per_token

    config = load_package(str(directory)).config
    return kv_bytes_per_token(config, __import__("torch").float16) * 16 * 8


def test_stop_string_inside_an_accepted_run_and_counters(tiny_model):
    directory, _ = tiny_model("llama")
    plain, spec = LLM(str(directory)), LLM(str(directory), speculative_config=SPEC)
    # The model's own greedy continuation in the prompt: most drafts are right, so stops fall in accepted runs.
    prompt = _prompts()[0] + plain.generate([_prompts()[0]], GREEDY)[0].token_ids
    text = plain.generate([prompt], GREEDY)[0].text
    for cut in (len(text) // 3, len(text) // 2, 2 * len(text) // 3):
        params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[text[cut : cut + 3]])
        ours, theirs = spec.generate([prompt], params)[0], plain.generate([prompt], params)[0]
        assert (ours.text, ours.token_ids, ours.finish_reason) == (theirs.text, theirs.token_ids, "stop")
    metric = spec.engine.metrics.registry.get_sample_value
    per_pos = [
        metric("nanoinfer:spec_decode_num_accepted_tokens_per_pos_total", {"position": str(i)}) or 0 for i in range(4)
    ]
    assert sum(per_pos) == metric("nanoinfer:spec_decode_num_accepted_tokens_total") > 0
    assert per_pos == sorted(per_pos, reverse=True)  # a later position is kept only after the earlier ones
