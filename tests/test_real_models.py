"""The real built-in GGUF models end to end: our greedy tokens equal transformers' GGUF-loaded model."""

from __future__ import annotations

import pytest
import torch

from nanoinfer import LLM, SamplingParams
from nanoinfer.loading import registry

GREEDY_32 = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


def _hf_model(path):
    """transformers' GGUF loading (its dequantizer and un-permute), without needing accelerate."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    transformers.utils.logging.disable_progress_bar()
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, _ = model.load_state_dict(tensors, strict=False)
    assert set(missing) <= {"lm_head.weight"}, missing  # tied heads are absent from the file
    model.tie_weights()
    return model.eval()


def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """Greedy decoding with transformers' own KV cache, EOS ignored (plain loop: generate() refills eos)."""
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        tokens = []
        for _ in range(n):
            token = int(out.logits[0, -1].argmax())
            tokens.append(token)
            out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens


def _check(name: str, path, prompts: list[list[int]], llm: LLM) -> None:
    hf = _hf_model(path)
    ours = llm.generate(prompts, GREEDY_32)
    for prompt, out in zip(prompts, ours):
        assert out.token_ids == _hf_greedy(hf, prompt, 32), f"{name}: greedy continuation differs"
    ids = prompts[0]
    ref = hf(torch.tensor([ids])).logits[0]
    diff = (llm.engine.model.score(ids) - ref).abs().max().item()
    assert diff < 1e-3, f"{name}: logits differ by {diff}"


def test_smollm2_greedy_matches_transformers():
    llm = LLM("smollm2-135m-instruct", dtype="float32", quantization="none")
    chat = llm.chat_prompt([{"role": "user", "content": "What is the capital of France?"}])
    raw = llm.tokenizer.encode("The quick brown fox", add_special_tokens=True)
    _check("smollm2", registry.smollm2_path(), [chat, raw], llm)
    assert (
        "Paris"
        in llm.chat(
            [{"role": "user", "content": "What is the capital of France?"}],
            SamplingParams(temperature=0, max_tokens=16),
        ).text
    )


@pytest.mark.slow
def test_gemma3_greedy_matches_transformers():
    llm = LLM("gemma3-270m", dtype="float32", quantization="none")
    raw = llm.tokenizer.encode("The capital of France is", add_special_tokens=True)
    _check("gemma3", registry.gemma3_path(), [raw], llm)


def test_make_run_answers_coherently():
    """`make run`'s question at the default model's recommended sampling (no request settings)
    answers about caches: checked on content words over a few seeds, not on exact text."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    makefile = (Path(__file__).parent.parent / "Makefile").read_text()
    question = re.search(r'nanoinfer run .*"(.+)"', makefile).group(1)
    llm = LLM()
    assert (llm.engine.generation.temperature, llm.engine.generation.top_p) == (0.2, 0.9)
    prompt = llm.chat_prompt([{"role": "user", "content": question}])
    for seed in range(3):
        text = llm.generate([prompt], llm.default_params(max_tokens=96, seed=seed))[0].outputs[0].text.lower()
        assert "cache" in text and any(w in text for w in ("store", "data", "memory", "key", "value", "retriev")), text
    cli = subprocess.run(
        [sys.executable, "-m", "nanoinfer", "run", "--max-tokens", "48", "--seed", "0", question],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert cli.returncode == 0 and "cache" in cli.stdout.lower(), cli.stdout + cli.stderr
