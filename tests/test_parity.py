"""nanoinfer's Transformer against transformers on tiny random models: fp32 logits and greedy decoding."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import CASE_IDS, VOCAB_SIZE

from nanoinfer.loading.hf import load_hf_dir

PROMPT_LEN = 32
NEW_TOKENS = 32
LOGIT_TOL = 1e-4


def random_prompt(case_id: str) -> list[int]:
    """A fixed random prompt per case (ids over the whole vocab, specials included)."""
    gen = torch.Generator().manual_seed(sum(map(ord, case_id)))
    return torch.randint(0, VOCAB_SIZE, (PROMPT_LEN,), generator=gen).tolist()


def hf_greedy(hf_model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation of exactly n tokens, with eos disabled rather than suppressed."""
    config = copy.deepcopy(hf_model.generation_config)
    config.update(do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None)
    # generate() refills unset fields from model.generation_config, which would bring eos back and
    # make min_new_tokens mask it out of the argmax; so swap the model's own config for the run.
    saved, hf_model.generation_config = hf_model.generation_config, config
    ids = torch.tensor([prompt])
    try:
        with torch.no_grad():
            out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    finally:
        hf_model.generation_config = saved
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_prompt_logits_match_transformers(case_id: str, tiny_model) -> None:
    from nanoinfer.model.transformer import Transformer

    path, hf_model = tiny_model(case_id)
    prompt = random_prompt(case_id)
    model = Transformer.from_package(load_hf_dir(path), dtype=torch.float32)
    ours = model.score(prompt)
    with torch.no_grad():
        ref = hf_model(torch.tensor([prompt])).logits[0].float()
    assert ours.shape == ref.shape
    diff = (ours - ref).abs()
    worst = int(diff.max(dim=-1).values.argmax())
    assert diff.max().item() <= LOGIT_TOL, (
        f"{case_id}: max |logit diff| {diff.max().item():.3g} (first bad position "
        f"{int((diff.max(dim=-1).values > LOGIT_TOL).nonzero()[0])}, worst {worst})"
    )


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_greedy_continuation_matches_transformers(case_id: str, tiny_model) -> None:
    from nanoinfer import LLM, SamplingParams

    path, hf_model = tiny_model(case_id)
    prompt = random_prompt(case_id)
    expected = hf_greedy(hf_model, prompt, NEW_TOKENS)
    llm = LLM(str(path), dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    ours = list(llm.generate([prompt], params)[0].token_ids)
    first_diff = next((i for i, (a, b) in enumerate(zip(ours, expected)) if a != b), None)
    assert ours == expected, f"{case_id}: greedy tokens differ from index {first_diff}: {ours} vs {expected}"
