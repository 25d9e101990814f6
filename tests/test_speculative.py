"""Speculative decoding (n-gram proposer) on tiny random models: lossless, inside the engine."""

from __future__ import annotations

import random
from collections import Counter

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
    # The model's own answer, then the question again: the first answer holds good guesses even
    # for a model whose answers never repeat themselves.
    prompts.append(prompts[0] + plain.generate([prompts[0]], GREEDY)[0].token_ids + prompts[0])
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


def test_ngram_lookup():
    proposer = NgramProposer(SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_max=3, prompt_lookup_min=2))
    state = DraftState()
    assert proposer.lookup(state, [1, 2, 3, 4, 5, 9, 1, 2, 3], 3) == ([4, 5, 9], 3)  # after the earlier [1, 2, 3]
    assert proposer.lookup(state, [], 2) == ([4, 5], 3)  # nothing new since
    assert proposer.lookup(state, [4], 3) == ([5, 9, 1], 3)  # a new token moves the lookup
    assert proposer.lookup(state, [4, 5], 2) == ([9, 1], 2)  # only [4, 5] recurs: a shorter n-gram
    assert proposer.lookup(DraftState(), [7, 8, 9, 10], 3) == ([], 0)
    assert proposer.lookup(DraftState(), [256, 1, 256, 1], 3) == ([256, 1], 2)  # token-aligned matches only


def test_draft_length_follows_acceptance_batch_and_backs_off():
    proposer = NgramProposer(SpeculativeConfig(num_speculative_tokens=6))
    state = DraftState()
    # Prior rate 1/2: position j survives with 2^-j; alone a row is worth it above 1/7.5.
    assert proposer.draft_len(state, limit=10, step=1) == 2
    assert proposer.draft_len(state, 10, 1, batch=16) == 1  # a probe: rows cost more in a batch
    assert proposer.draft_len(state, 10, 2, batch=16) == 0  # and the next only 32 steps later
    assert proposer.draft_len(state, 10, 33, batch=16) == 1
    proposer.record(state, 2, 2, step=2)  # rate (0.5 + 2) / (1 + 2)
    assert proposer.draft_len(state, 10, 3) == 6  # capped at num_speculative_tokens
    assert proposer.draft_len(state, 4, 3) == 4  # and at the room left
    assert proposer.draft_len(state, 10, 3, batch=16) == 1  # only rate^1 = 0.83 beats 16 / 22.5
    proposer.record(state, 6, 6, step=3)
    assert proposer.draft_len(state, 10, 4, batch=16) == 6
    proposer.record(state, 6, 0, step=4)  # a miss: a pause of 2 steps, and a lower rate
    assert proposer.draft_len(state, 10, 5) == 0
    assert proposer.draft_len(state, 10, 6, batch=16) == 1 and proposer.draft_len(state, 10, 6) == 6
    proposer.record(state, 2, 0, step=6)  # another: pause 4
    assert proposer.draft_len(state, 10, 9) == 0 and proposer.draft_len(state, 10, 10) > 0
    proposer.record(state, 2, 1, step=10)
    assert state.misses == 0


class _Tokens:
    """What NgramProposer.propose reads of a Sequence."""

    def __init__(self, ids: list[int]):
        self.ids, self.draft_state, self.draft_ids, self.draft_probs = ids, None, [], None

    def __len__(self) -> int:
        return len(self.ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        return self.ids[start:end]


def test_short_matches_are_drafted_only_where_rows_are_cheap():
    proposer = NgramProposer(SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_max=3, prompt_lookup_min=2))
    full = [1, 2, 3, 4, 5, 6, 7, 1, 2, 3]  # [1, 2, 3] recurs: a match of full length
    short = [1, 2, 3, 4, 5, 6, 7, 9, 2, 3]  # only [2, 3] recurs

    def drafts(ids: list[int], batch: int, rate: float = 0.9) -> list[int]:
        seqs = [_Tokens(ids) for _ in range(batch)]
        for seq in seqs:
            seq.draft_state = DraftState(hits=rate, trials=1.0)
        proposer.propose(seqs, [10] * batch, step=1)  # type: ignore[arg-type]
        return seqs[0].draft_ids

    assert drafts(full, 1) == [4, 5, 6, 7]
    assert drafts(full, 16) == [4, 5, 6]  # chance 0.9 ** j beats 16 / 22.5 up to j = 3
    # A short match counts as a chance of at most SHORT_MATCH_RATE: alone, two positions (0.4 and
    # 0.16 beat 1 / 7.5), or one at a lower rate (0.3, then 0.09); in a batch of 16, none.
    assert drafts(short, 1) == [4, 5]
    assert drafts(short, 1, rate=0.3) == [4]
    assert drafts(short, 16) == []
    assert drafts(short, 16, rate=0.5) == []  # not even the probe a low rate gets in a batch
    assert drafts(full, 16, rate=0.5) == [4]


def test_bad_speculative_configs_are_refused(tiny_model):
    directory, _ = tiny_model("llama")
    for bad in (
        {"method": "eagle"},
        {"method": "ngram", "num_speculative_tokens": 0},
        {"bogus": 1},
        {"method": "draft_model"},  # no model
        {"method": "ngram", "model": str(directory)},
        {"model": str(directory), "quantization": "int3"},
        {"model": str(directory / "missing")},
        "not json",
    ):
        with pytest.raises(NanoInferError):
            LLM(str(directory), speculative_config=bad)


def _chi_square_critical(df: int, z: float = 3.09) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z = 3.09: alpha = 0.001)."""
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


def _chi_square(counts: list[Counter[tuple[int, ...]]]) -> tuple[float, int]:
    """Two-sample chi-square statistic and degrees of freedom of two outcome tallies."""
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
    return stat, df


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
        # Batches of 4: its lookups find short n-grams, drafted only where rows are cheap.
        llm = LLM(str(directory), speculative_config=config, max_num_seqs=4)
        outs = llm.generate([prompt] * 2000, params)
        counts.append(Counter(tuple(o.token_ids) for o in outs))
        if config is not None:
            assert (
                0
                < _accepted(llm)
                < llm.engine.metrics.registry.get_sample_value("nanoinfer:spec_decode_num_draft_tokens_total")
            ), "the test needs both accepted and rejected drafts"
    stat, df = _chi_square(counts)
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


# ---- the draft-model proposer ------------------------------------------------------------------


def _draft_config(directory, **extra) -> dict:
    return {"method": "draft_model", "model": str(directory), "num_speculative_tokens": 4, **extra}


def _draft_blocks_in_use(llm: LLM) -> int:
    return llm.engine.proposer.allocator.num_used


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_draft_model_greedy_outputs_are_identical(tiny_model, case_id):
    """The target drafted by itself at int4 (mostly right) and by another architecture (mostly wrong)."""
    directory, _ = tiny_model(case_id)
    other, _ = tiny_model("qwen2" if case_id != "qwen2" else "llama")
    plain = LLM(str(directory))
    prompts = _prompts()
    expected = [o.token_ids for o in plain.generate(prompts, GREEDY)]
    for draft in (_draft_config(directory, quantization="int4"), _draft_config(other)):
        spec = LLM(str(directory), speculative_config=draft)
        assert [o.token_ids for o in spec.generate(prompts, GREEDY)] == expected
        drafted = spec.engine.metrics.registry.get_sample_value("nanoinfer:spec_decode_num_draft_tokens_total")
        assert drafted > 0
        spec.engine.check_integrity()
        assert _draft_blocks_in_use(spec) == 0, "finished requests still hold draft KV blocks"
    assert _accepted(spec) < drafted, "the other architecture's drafts were never rejected"


def test_draft_model_self_draft_is_always_accepted(tiny_model):
    directory, _ = tiny_model("llama")
    spec = LLM(str(directory), speculative_config=_draft_config(directory))
    out = spec.generate([_prompts()[1]], GREEDY)[0]
    metric = spec.engine.metrics.registry.get_sample_value
    assert _accepted(spec) == metric("nanoinfer:spec_decode_num_draft_tokens_total") > len(out.token_ids) // 2
    # The draft model ran its own cache: the prompt once, then one token per draft position.
    assert spec.engine.proposer.num_forwarded_tokens >= len(_prompts()[1])


def test_draft_model_sampling_keeps_the_target_distribution(tiny_model):
    """Rejection sampling against the draft's own distribution q keeps the target's.

    As the n-gram test above (2,000 samples per arm, alpha = 0.001, same power statement), drafted
    by the target itself at int4, so p and q differ a little and both acceptance and rejection with
    a residual max(0, p - q) occur; penalties and top-k shape both p and q."""
    directory, _ = tiny_model("llama")
    prompt = _prompts()[1]
    params = SamplingParams(temperature=1.0, top_k=3, max_tokens=3, ignore_eos=True, repetition_penalty=1.2)
    counts = []
    for config in (None, _draft_config(directory, num_speculative_tokens=2, quantization="int4")):
        llm = LLM(str(directory), speculative_config=config, max_num_seqs=256)
        outs = llm.generate([prompt] * 2000, params)
        counts.append(Counter(tuple(o.token_ids) for o in outs))
        if config is not None:
            drafted = llm.engine.metrics.registry.get_sample_value("nanoinfer:spec_decode_num_draft_tokens_total")
            assert 0 < _accepted(llm) < drafted, "the test needs both accepted and rejected drafts"
            assert _draft_blocks_in_use(llm) == 0
    stat, df = _chi_square(counts)
    assert df >= 2, "too few outcomes for the test to mean anything"
    assert stat < _chi_square_critical(df), f"chi-square {stat:.1f} on {df} degrees of freedom"


def test_draft_model_preemption_abort_n_and_seeds(tiny_model):
    directory, _ = tiny_model("llama")
    config = _draft_config(directory, quantization="int4")
    prompts = [_prompts()[0][i:] for i in range(0, 24, 3)]
    plain = LLM(str(directory), kv_cache_memory=_small_pool(directory), block_size=16)
    spec = LLM(str(directory), kv_cache_memory=_small_pool(directory), block_size=16, speculative_config=config)
    expected = [o.token_ids for o in plain.generate(prompts, GREEDY)]
    assert [o.token_ids for o in spec.generate(prompts, GREEDY)] == expected
    assert spec.engine.scheduler.num_preemptions > 0
    forked = spec.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, n=3))[0]
    assert [c.token_ids for c in forked.outputs] == [expected[0][:20]] * 3
    spec.engine.add_request("gone", prompts[1], GREEDY)
    for _ in range(4):
        spec.engine.step()
    assert _draft_blocks_in_use(spec) > 0
    spec.engine.abort("gone")
    spec.engine.check_integrity()
    assert _draft_blocks_in_use(spec) == 0 and spec.engine.kv_manager.usage().in_use == 0
    seeded = SamplingParams(temperature=0.8, max_tokens=20, seed=3, ignore_eos=True, n=2)
    first = LLM(str(directory), speculative_config=config).generate(prompts[:2], seeded)
    again = LLM(str(directory), speculative_config=config).generate(prompts[:2], seeded)
    assert [[c.token_ids for c in o.outputs] for o in first] == [[c.token_ids for c in o.outputs] for o in again]


def test_draft_model_must_share_the_tokenizer(tiny_model, smollm_path):
    directory, _ = tiny_model("llama")
    with pytest.raises(NanoInferError, match="draft model's tokenizer has 49152 tokens, the target's 300"):
        LLM(str(directory), speculative_config=_draft_config(smollm_path))


# ---- the real built-in models ------------------------------------------------------------------

_CODE = """def moving_average(values, window):
    if window <= 0:
        raise ValueError("window must be positive")
    total, result = 0.0, []
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            result.append(total / window)
    return result
"""
_REAL_GREEDY = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)


def _real_prompts(llm: LLM) -> list[list[int]]:
    """One answer that copies its prompt (drafts mostly right), one free answer (mostly wrong)."""
    return [
        llm.chat_prompt([{"role": "user", "content": f"Repeat this code exactly, in a code block:\n\n{_CODE}"}]),
        llm.chat_prompt([{"role": "user", "content": "Tell me a short story about a cat and a lighthouse."}]),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma3-270m"])
def test_real_models_ngram_greedy_is_identical(name):
    """The default quantization's fused decode stack verifies drafts as decode rows: same tokens."""
    plain, spec = LLM(name), LLM(name, speculative_config=SPEC)
    prompts = _real_prompts(plain)
    expected = [o.token_ids for o in plain.generate(prompts, _REAL_GREEDY)]
    assert [o.token_ids for o in spec.generate(prompts, _REAL_GREEDY)] == expected  # batched
    assert [spec.generate([p], _REAL_GREEDY)[0].token_ids for p in prompts] == expected  # alone
    assert _accepted(spec) > 20, "the copying prompt should have accepted many drafts"
    spec.engine.check_integrity()


@pytest.mark.slow
def test_real_model_int4_draft_for_a_float32_target():
    """SmolLM2 in float32 drafted by its own int4 weights: identical tokens, most drafts accepted."""
    name = "smollm2-135m-instruct"
    target = {"dtype": "float32", "quantization": "none"}
    plain = LLM(name, **target)
    spec = LLM(name, **target, speculative_config={"model": name, "quantization": "int4", "num_speculative_tokens": 4})
    assert spec.engine.proposer.quantization == "int4" and spec.engine.quantization == "none"
    prompts = _real_prompts(plain)
    expected = [o.token_ids for o in plain.generate(prompts, _REAL_GREEDY)]
    assert [o.token_ids for o in spec.generate(prompts, _REAL_GREEDY)] == expected
    drafted = spec.engine.metrics.registry.get_sample_value("nanoinfer:spec_decode_num_draft_tokens_total")
    assert _accepted(spec) > 0.6 * drafted
    spec.engine.check_integrity()
    assert _draft_blocks_in_use(spec) == 0
