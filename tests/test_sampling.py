"""SamplingParams validation, the batched Sampler, and stop-string handling."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoinfer.engine.sampler import Sampler, SamplingState
from nanoinfer.engine.stop import StopChecker
from nanoinfer.errors import RequestError
from nanoinfer.sampling_params import SamplingParams

sampler = Sampler()


def states_for(n: int, prompt_ids: tuple[int, ...] = (), seed0: int = 0, **kw) -> list[SamplingState]:
    """n states with distinct fixed seeds, so the whole test is deterministic."""
    return [SamplingState(SamplingParams(seed=seed0 + i, **kw), prompt_ids) for i in range(n)]


def draw(logits_row: list[float], n: int = 2000, **kw) -> torch.Tensor:
    """n independent samples (one per row of a replicated batch) from one logits row."""
    logits = torch.tensor([logits_row], dtype=torch.float32).repeat(n, 1)
    return torch.tensor(sampler.sample(logits, states_for(n, **kw)).token_ids)


def support(logits_row: list[float], **kw) -> set[int]:
    return set(draw(logits_row, **kw).tolist())


def processed(logits_row: list[float], state: SamplingState) -> torch.Tensor:
    """One row's logits after the sampler's penalty and bias steps."""
    x = torch.tensor([logits_row], dtype=torch.float32)
    Sampler._apply_penalties(x, [state])
    Sampler._apply_logit_bias(x, [state.params])
    return x[0]


# ---------------------------------------------------------------- SamplingParams


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-0.1),
        dict(top_p=0.0),
        dict(top_p=1.01),
        dict(top_k=-2),
        dict(min_p=-0.01),
        dict(min_p=1.5),
        dict(repetition_penalty=0.0),
        dict(repetition_penalty=-1.0),
        dict(presence_penalty=2.5),
        dict(presence_penalty=-2.01),
        dict(frequency_penalty=3.0),
        dict(frequency_penalty=-2.5),
        dict(max_tokens=0),
        dict(n=0),
        dict(logprobs=-1),
        dict(logprobs=21),
        dict(stop=""),
        dict(stop=["ok", ""]),
        dict(logit_bias={"5": 1.0}),
        dict(logit_bias={5: 100.5}),
        dict(logit_bias={5: -101}),
        dict(seed="7"),
    ],
)
def test_invalid_params_raise_value_error(kwargs):
    with pytest.raises(ValueError) as err:
        SamplingParams(**kwargs)
    assert isinstance(err.value, RequestError)
    assert next(iter(kwargs)).split("_")[0] in str(err.value)


def test_params_normalize_and_accept_boundaries():
    p = SamplingParams(
        stop="###", top_p=1.0, top_k=-1, min_p=1.0, presence_penalty=-2, logprobs=20, logit_bias={3: 100, 4: -100}
    )
    assert p.stop == ["###"] and p.stop_token_ids == [] and p.logit_bias == {3: 100.0, 4: -100.0}
    assert SamplingParams().stop == [] and SamplingParams().logit_bias == {}
    assert SamplingParams(logprobs=0).logprobs == 0
    assert SamplingParams(temperature=0).greedy and SamplingParams(temperature=1e-6).greedy
    assert not SamplingParams(temperature=1e-3).greedy
    with pytest.raises(ValueError, match="out of range"):
        SamplingParams(logit_bias={10: 1.0}).check_vocab(10)
    SamplingParams(logit_bias={9: 1.0}, stop_token_ids=[9]).check_vocab(10)


def test_from_request_precedence():
    defaults = SimpleNamespace(temperature=0.6, top_p=0.9, top_k=None, repetition_penalty=1.1)
    p = SamplingParams.from_request(defaults=defaults, temperature=None, top_p=0.5, max_tokens=None)
    assert p.temperature == 0.6  # None: the model's default
    assert p.top_p == 0.5  # explicit wins
    assert p.top_k == 0  # default object has None: the dataclass default
    assert p.repetition_penalty == 1.1  # absent: the model's default
    assert p.max_tokens == 16
    assert SamplingParams.from_request(temperature=0.0).temperature == 0.0  # 0 is not None
    with pytest.raises(ValueError, match="unknown"):
        SamplingParams.from_request(temprature=1.0)


# ---------------------------------------------------------------- randomness


def test_same_seed_same_tokens_and_independent_of_batch():
    torch.manual_seed(0)
    logits = torch.randn(1, 50)
    others = torch.randn(5, 50)

    def run(batch: torch.Tensor, seeds: list[int], row: int, steps: int = 20) -> list[int]:
        states = [SamplingState(SamplingParams(seed=s, temperature=1.5)) for s in seeds]
        out = []
        for _ in range(steps):
            out.append(sampler.sample(batch, states).token_ids[row])
        return out

    alone = run(logits, [42], 0)
    assert alone == run(logits, [42], 0)
    assert len(set(alone)) > 3  # it really samples
    mixed = torch.cat([others[:2], logits, others[2:]])
    assert run(mixed, [1, 2, 42, 3, 4, 5], 2) == alone  # other rows, other seeds, other position
    assert run(logits, [43], 0) != alone


def test_unseeded_requests_differ():
    logits = torch.zeros(1, 1000)
    a = [sampler.sample(logits, [SamplingState(SamplingParams())]).token_ids[0] for _ in range(5)]
    b = [sampler.sample(logits, [SamplingState(SamplingParams())]).token_ids[0] for _ in range(5)]
    assert a != b


def test_choices_of_one_seeded_request_differ():
    logits = torch.zeros(1, 1000)
    p = SamplingParams(seed=7, n=2)
    first = [sampler.sample(logits, [SamplingState(p, index=i)]).token_ids[0] for i in range(2)]
    again = [sampler.sample(logits, [SamplingState(p, index=i)]).token_ids[0] for i in range(2)]
    assert first == again and first[0] != first[1]


def test_greedy_and_top_k_one_match_argmax():
    torch.manual_seed(1)
    logits = torch.randn(8, 100)
    expected = logits.argmax(-1).tolist()
    greedy = [SamplingState(SamplingParams(temperature=0)) for _ in range(8)]
    top1 = [SamplingState(SamplingParams(top_k=1, temperature=2.0, seed=i)) for i in range(8)]
    assert sampler.sample(logits, greedy).token_ids == expected
    assert sampler.sample(logits, top1).token_ids == expected
    mixed = [greedy[0], top1[1], greedy[2], top1[3], *greedy[4:]]
    assert sampler.sample(logits, mixed).token_ids == expected
    # bf16 input takes the fast path and is not modified.
    half = logits.bfloat16()
    before = half.clone()
    assert sampler.sample(half, greedy).token_ids == half.float().argmax(-1).tolist()
    assert torch.equal(half, before)


# ---------------------------------------------------------------- filtering

LOG_PROBS = [math.log(p) for p in (0.5, 0.25, 0.125, 0.0625, 0.0625)]


def test_top_k_keeps_exactly_k():
    logits = [0.0, 3.0, 1.0, 2.0, -1.0]
    assert support(logits, top_k=2, temperature=5.0) == {1, 3}
    assert support(logits, top_k=3, temperature=5.0) == {1, 2, 3}
    assert support(logits, top_k=0, temperature=5.0) == {0, 1, 2, 3, 4}
    assert support(logits, top_k=-1, temperature=5.0) == {0, 1, 2, 3, 4}
    assert support(logits, top_k=100, temperature=5.0) == {0, 1, 2, 3, 4}


@pytest.mark.parametrize(
    "top_p, kept",
    [
        (0.3, {0}),  # top token alone already has mass >= top_p
        (0.4999, {0}),
        (0.5001, {0, 1}),
        (0.7499, {0, 1}),
        (0.7501, {0, 1, 2}),
        (0.9, {0, 1, 2, 3}),
        (1.0, {0, 1, 2, 3, 4}),
    ],
)
def test_top_p_keeps_smallest_set_reaching_mass(top_p, kept):
    assert support(LOG_PROBS, top_p=top_p) == kept


def test_top_p_applies_after_top_k():
    # After top-3 renormalization the masses are 4/7, 2/7, 1/7; without it 0.8 would need three
    # tokens (0.5 + 0.25 < 0.8) and 0.55 two.
    assert support(LOG_PROBS, top_k=3, top_p=0.8) == {0, 1}
    assert support(LOG_PROBS, top_k=3, top_p=0.55) == {0}


def _reference_support(row: torch.Tensor, top_k: int, top_p: float, min_p: float) -> set[int]:
    """Top-k, then top-p over the renormalized survivors, then min-p, by a full sort of one row."""
    values, order = row.sort(descending=True)
    if 0 < top_k < len(row):
        values, order = values[:top_k], order[:top_k]
    probs = torch.softmax(values.double(), dim=0)
    mass_before = torch.cumsum(probs, dim=0) - probs
    keep = (mass_before < top_p) & (probs >= min_p * probs[0])
    return set(order[keep].tolist())


def test_partial_sort_filters_match_a_full_sort_batched():
    """Wide vocabularies take top-k/top-p candidates from a partial sort (CANDIDATES), falling back
    to a full sort when a nucleus is wider; either way each row's kept set is the full sort's (up
    to a token at the top-p boundary, where float32 and float64 sums may round apart), whatever
    its batch neighbours ask: a row without top-k/top-p keeps every token."""
    from nanoinfer.engine.sampler import CANDIDATES, _filter_top_k_top_p_min_p

    vocab = 20_000
    torch.manual_seed(0)
    rows = [  # (logit scale, top_k, top_p, min_p): narrow nuclei fit the candidates, wide ones do not
        (8.0, 0, 0.9, 0.0),
        (1.0, 0, 0.9, 0.0),
        (8.0, CANDIDATES + 200, 0.95, 0.0),
        (1.0, CANDIDATES + 200, 1.0, 0.0),
        (3.0, 40, 0.8, 0.05),
        (1.0, 0, 1.0, 0.1),
        (1.0, 0, 1.0, 0.0),
    ]
    logits = torch.stack([torch.randn(vocab) * scale for scale, *_ in rows])
    params = [SamplingParams(temperature=1.0, top_k=k, top_p=p, min_p=m) for _, k, p, m in rows]
    narrow = [0, 2, 3, 4, 5, 6]  # without the wide row every nucleus fits: no fallback
    for batch in (narrow, list(range(len(rows))), [1], [0]):
        filtered = logits[batch].clone()
        _filter_top_k_top_p_min_p(filtered, [params[i] for i in batch])
        for j, i in enumerate(batch):
            kept = set(torch.nonzero(torch.isfinite(filtered[j])).flatten().tolist())
            reference = _reference_support(logits[i], *rows[i][1:])
            assert len(kept ^ reference) <= 1, (batch, rows[i], len(kept), len(reference))
            if i == len(rows) - 1:
                assert len(kept) == vocab  # the last row asked for nothing
            if i == 1:
                assert len(kept) > CANDIDATES  # the fallback ran: this nucleus is wider


@pytest.mark.parametrize(
    "min_p, kept",
    [(0.0, {0, 1, 2, 3, 4}), (0.1, {0, 1, 2, 3, 4}), (0.2, {0, 1, 2}), (0.26, {0, 1}), (0.6, {0}), (1.0, {0})],
)
def test_min_p_drops_below_fraction_of_max(min_p, kept):
    # Relative probabilities to the top: 1, 0.5, 0.25, 0.125, 0.125.
    assert support(LOG_PROBS, min_p=min_p) == kept


def test_filters_are_per_row():
    logits = torch.tensor([LOG_PROBS] * 3, dtype=torch.float32).repeat(500, 1)
    params = [SamplingParams(top_k=1), SamplingParams(top_p=0.7), SamplingParams(min_p=0.2)]
    states = [SamplingState(SamplingParams(**{**vars(params[i % 3]), "seed": i})) for i in range(1500)]
    tokens = torch.tensor(sampler.sample(logits, states).token_ids)
    assert set(tokens[0::3].tolist()) == {0}
    assert set(tokens[1::3].tolist()) == {0, 1}
    assert set(tokens[2::3].tolist()) == {0, 1, 2}


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_empirical_distribution_matches_softmax_over_temperature(temperature):
    logits = [1.0, 0.5, 0.0, -0.5, -1.0]
    n = 8000
    counts = torch.bincount(draw(logits, n=n, temperature=temperature), minlength=5).float() / n
    expected = torch.softmax(torch.tensor(logits) / temperature, dim=0)
    assert torch.allclose(counts, expected, atol=0.025), (counts, expected)


def test_low_temperature_concentrates_high_spreads():
    logits = [2.0, 1.0, 0.0, -1.0]
    low = torch.bincount(draw(logits, temperature=0.05), minlength=4)
    high = torch.bincount(draw(logits, temperature=50.0), minlength=4)
    assert low[0] == 2000
    assert (high > 350).all()


# ---------------------------------------------------------------- penalties and bias


def test_repetition_penalty_hf_semantics():
    logits = [2.0, -2.0, 1.0, -1.0, 0.0, 3.0]
    state = SamplingState(SamplingParams(repetition_penalty=2.0), prompt_ids=[0, 1])
    state.output_ids += [2, 3, 3]
    out = processed(logits, state)
    assert out.tolist() == [1.0, -4.0, 0.5, -2.0, 0.0, 3.0]  # 3 counted once; 4, 5 unseen


def test_presence_and_frequency_penalties_use_output_only():
    logits = [1.0] * 5
    state = SamplingState(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), prompt_ids=[0])
    state.output_ids += [1, 2, 2, 2]
    assert processed(logits, state).tolist() == pytest.approx([1.0, 0.25, -0.25, 1.0, 1.0])
    # The cache follows later appends.
    state.output_ids.append(1)
    assert processed(logits, state).tolist() == pytest.approx([1.0, 0.0, -0.25, 1.0, 1.0])


def test_all_penalties_together_and_negative_presence():
    state = SamplingState(
        SamplingParams(repetition_penalty=1.5, presence_penalty=-1.0, frequency_penalty=0.5), prompt_ids=[3]
    )
    state.output_ids += [0, 0, 1]
    out = processed([3.0, -3.0, 1.0, 3.0], state)
    # token 0: 3/1.5 - 2*0.5 + 1 = 2; token 1: -3*1.5 - 0.5 + 1 = -4; token 3 in prompt only: 3/1.5 = 2
    assert out.tolist() == pytest.approx([2.0, -4.0, 1.0, 2.0])


def test_penalties_steer_sampling_and_rows_without_them_untouched():
    logits = torch.tensor([[5.0, 0.0, 0.0], [5.0, 0.0, 0.0]])
    penalized = SamplingState(SamplingParams(temperature=0, frequency_penalty=2.0))
    penalized.output_ids += [0, 0, 0]
    plain = SamplingState(SamplingParams(temperature=0))
    assert sampler.sample(logits, [penalized, plain]).token_ids == [1, 0]
    assert logits[0, 0] == 5.0  # caller's tensor is not modified


def test_logit_bias():
    state = SamplingState(SamplingParams(logit_bias={1: 10.0, 2: -100.0}))
    assert processed([0.0, 0.0, 5.0], state).tolist() == [0.0, 10.0, -95.0]
    logits = torch.tensor([[0.0, 0.0, 5.0]] * 2)
    biased = SamplingState(SamplingParams(temperature=0, logit_bias={1: 10.0}))
    plain = SamplingState(SamplingParams(temperature=0))
    assert sampler.sample(logits, [biased, plain]).token_ids == [1, 2]
    assert support([0.0, 0.0, 0.0], logit_bias={0: -100.0, 2: -100.0}) == {1}


# ---------------------------------------------------------------- logprobs


def test_logprobs_contents_and_sizes():
    torch.manual_seed(3)
    logits = torch.randn(4, 30)
    raw = torch.log_softmax(logits, dim=-1)
    states = [
        SamplingState(SamplingParams(temperature=0, logprobs=0)),
        SamplingState(SamplingParams(temperature=0, logprobs=3)),
        SamplingState(SamplingParams(temperature=0)),
        # Bias forces a token outside the raw top 2; its logprob is still the raw one.
        SamplingState(SamplingParams(temperature=0, logprobs=2, logit_bias={int(logits[3].argmin()): 100.0})),
    ]
    out = sampler.sample(logits, states)
    lp = out.logprobs
    assert lp[2] is None
    assert list(lp[0]) == [out.token_ids[0]]
    assert lp[0][out.token_ids[0]] == pytest.approx(raw[0].max().item())
    assert len(lp[1]) == 3 and list(lp[1]) == raw[1].topk(3).indices.tolist()
    assert all(v == pytest.approx(raw[1, t].item()) for t, v in lp[1].items())
    chosen = out.token_ids[3]
    assert chosen == int(logits[3].argmin())
    assert len(lp[3]) == 3 and next(iter(lp[3])) == chosen
    assert lp[3][chosen] == pytest.approx(raw[3, chosen].item())
    assert set(lp[3]) - {chosen} == set(raw[3].topk(2).indices.tolist())


def test_logprobs_are_raw_for_sampled_rows():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    state = SamplingState(SamplingParams(temperature=0.3, seed=0, logprobs=1, repetition_penalty=1.7), [2])
    out = sampler.sample(logits, [state])
    raw = torch.log_softmax(logits[0], dim=-1)
    for t, v in out.logprobs[0].items():
        assert v == pytest.approx(raw[t].item())
    assert 2 in out.logprobs[0]


# ---------------------------------------------------------------- stop strings


def stream(checker: StopChecker, pieces: list[str]) -> tuple[str, str | None]:
    """Feed pieces like the engine would; return (streamed text, final text if stopped)."""
    text, emitted = "", 0
    for piece in pieces:
        new_start = len(text)
        text += piece
        cut = checker.check(text, new_start)
        if cut is not None:
            return text[:cut], text[:cut]
        safe = checker.safe_prefix_len(text)
        assert safe >= emitted
        emitted = safe
    return text[:emitted], None


def test_stop_string_split_across_pieces():
    checker = StopChecker(["o w"])
    text = "Hel"
    assert checker.check(text, 0) is None
    assert checker.safe_prefix_len(text) == 3
    text += "lo wor"
    assert checker.check(text, 3) == 4
    assert stream(checker, ["Hel", "lo wor", "ld"]) == ("Hell", "Hell")
    assert stream(StopChecker(["o w"], include_stop_str_in_output=True), ["Hel", "lo wor", "ld"]) == (
        "Hello w",
        "Hello w",
    )


def test_stop_string_spanning_three_pieces():
    checker = StopChecker(["abcd"])
    text = "xab"
    assert checker.check(text, 0) is None
    assert checker.safe_prefix_len(text) == 1  # "ab" may begin the stop
    text += "c"
    assert checker.check(text, 3) is None
    assert checker.safe_prefix_len(text) == 1
    text += "de"
    assert checker.check(text, 4) == 1


def test_hold_back():
    checker = StopChecker(["</end>", "##"])
    assert checker.safe_prefix_len("hello") == 5
    assert checker.safe_prefix_len("hello </e") == 6
    assert checker.safe_prefix_len("hello #") == 6
    assert checker.safe_prefix_len("hello <") == 6
    assert checker.safe_prefix_len("") == 0
    assert checker.safe_prefix_len("</en") == 0
    # A false start is released once the text moves on.
    assert stream(checker, ["a </", "b> c"]) == ("a </b> c", None)
    assert StopChecker([]).safe_prefix_len("abc") == 3
    assert StopChecker([]).check("abc", 0) is None


def test_multiple_stops_earliest_wins():
    checker = StopChecker(["world", "lo"])
    assert checker.check("hello world", 0) == 3
    checker = StopChecker(["STOP", "X"])
    assert checker.check("aXbSTOP", 0) == 1
    assert checker.check("aSTOPbX", 0) == 1
    # The stop completed first wins, as character-by-character streaming would see it.
    assert StopChecker(["xyz", "y"]).check("axyz", 0) == 2
    assert stream(StopChecker(["xyz", "y"]), list("axyz")) == ("ax", "ax")
    # Same end: the longer one (earlier start) is cut.
    assert StopChecker(["bc", "abc"]).check("zabc", 0) == 1


def test_include_stop_str_in_output():
    checker = StopChecker(["\n\n", "END"], include_stop_str_in_output=True)
    assert checker.check("one\n\ntwo END", 0) == 5
    assert checker.check("one END more", 0) == 7
    assert StopChecker(["END"]).check("one END more", 0) == 4


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="abc", max_size=12),
    stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=3), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 12), max_size=5),
    include=st.booleans(),
)
def test_stop_result_does_not_depend_on_piece_boundaries(text, stops, cuts, include):
    bounds = sorted({c for c in cuts if c < len(text)} | {0, len(text)})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    checker = StopChecker(stops, include)
    streamed, final = stream(checker, pieces)
    assert (streamed, final) == stream(checker, list(text))
    if final is None:  # nothing stopped: everything not held back was streamed
        assert not any(s in text for s in stops)
        assert text.startswith(streamed)
