"""dtype="float32" means float32: computed and cached K/V in float32, logprobs equal to transformers'.

Every tiny architecture runs through the public LLM API with dtype="float32": a 32-token prompt
is prefilled, then 11 more tokens come from single-token decode steps that read K/V back from the
paged cache. Each generated token's logprob and its top-5 alternatives' must match transformers'
log_softmax of one full-sequence forward pass (prompt + generated tokens) within 1e-4.
"""

from __future__ import annotations

import pytest
import torch
from test_parity import PROMPT_LEN, random_prompt
from tiny_models import CASE_IDS

NEW_TOKENS = 12
TOP_N = 5
LOGPROB_TOL = 1e-4


def _record_chunks(llm) -> list[list[int]]:
    """Wrap the runner so each forward's per-sequence chunk sizes are recorded."""
    runner = llm.engine.runner
    calls: list[list[int]] = []
    execute = runner.execute

    def recording(chunks):
        calls.append([c.num_tokens for c in chunks])
        return execute(chunks)

    runner.execute = recording
    return calls


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_float32_logprobs_match_transformers(case_id: str, tiny_model) -> None:
    from nanoinfer import LLM, SamplingParams

    path, hf_model = tiny_model(case_id)
    prompt = random_prompt(case_id)
    llm = LLM(str(path), dtype="float32")
    kv = llm.engine.runner.kv_cache
    assert kv.k[0].dtype == torch.float32 and kv.v[0].dtype == torch.float32
    calls = _record_chunks(llm)

    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=TOP_N)
    out = llm.generate([prompt], params)[0]
    tokens = list(out.token_ids)
    logprobs = out.outputs[0].logprobs
    assert len(tokens) == NEW_TOKENS and logprobs is not None and len(logprobs) == NEW_TOKENS

    # One prefill of the whole prompt, then one cached decode step per further token.
    assert calls[0] == [PROMPT_LEN], calls
    assert calls[1:] == [[1]] * (NEW_TOKENS - 1), calls

    with torch.no_grad():
        ref_logits = hf_model(torch.tensor([prompt + tokens])).logits[0].float()
    # row PROMPT_LEN - 1 + i predicts generated token i
    ref = torch.log_softmax(ref_logits[PROMPT_LEN - 1 : PROMPT_LEN - 1 + NEW_TOKENS], dim=-1)

    expected_tokens = ref.argmax(dim=-1).tolist()
    assert tokens == expected_tokens, f"{case_id}: greedy tokens {tokens} vs transformers' argmax {expected_tokens}"

    worst = 0.0
    for i, (token, entry) in enumerate(zip(tokens, logprobs)):
        assert token in entry, f"{case_id}: step {i} logprobs lack the chosen token {token}"
        top_ids = ref[i].topk(TOP_N).indices.tolist()
        # the chosen token plus our top-5, which must be transformers' top-5
        assert len(entry) <= TOP_N + 1 and set(top_ids) <= set(entry), (
            f"{case_id}: step {i} logprob entries {sorted(entry)} vs transformers' top-{TOP_N} {sorted(top_ids)}"
        )
        for t, value in entry.items():
            diff = abs(value - ref[i, t].item())
            worst = max(worst, diff)
            assert diff <= LOGPROB_TOL, (
                f"{case_id}: step {i} ({'prefill' if i == 0 else 'decode'}) token {t}: "
                f"logprob {value:.6f} vs transformers {ref[i, t].item():.6f} (|diff| {diff:.3g})"
            )
    print(f"{case_id}: max |logprob diff| {worst:.3g}")


def test_auto_dtype_caches_float16_on_cpu(tiny_model) -> None:
    """dtype "auto" (the default) on CPU with our C kernels keeps a float16 KV cache.

    This is the speed default: decode attention streams the whole cache every step, and half the
    bytes make it much faster (docs/performance.md, "KV cache dtype"). Activations stay float32;
    only K/V are rounded when stored. Asking for dtype="float32" opts out (test above).
    """
    from nanoinfer import LLM
    from nanoinfer.kernels import kernels

    if kernels() is None:
        pytest.skip("C kernels unavailable: auto keeps the activations' dtype (float32)")
    path, _ = tiny_model("llama")
    llm = LLM(str(path))
    kv = llm.engine.runner.kv_cache
    assert kv.k[0].dtype == torch.float16 and kv.v[0].dtype == torch.float16
