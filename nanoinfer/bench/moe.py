"""The `moe` scenario: does a mixture of experts decode like the dense model of its active size?

    python -m nanoinfer.bench.compare --scenarios moe --engines nanoinfer

Two random-weight models written with transformers' `save_pretrained` (no MoE ships as a
package): a qwen3_moe with 32 experts, 4 active, each 256 wide, and a qwen3 whose one MLP is
4 x 256 wide, so both run the same number of active parameters per token; otherwise equal (8
layers, hidden 512, 8 heads of 64, 4 KV heads, a 8192-token vocabulary). Decode tokens/s at
batch 1 and 16 (EOS ignored), nanoinfer float32 and int4, MoE against dense in rounds; and the
MoE in transformers at batch 16 (float32, static batch, `generate`), against nanoinfer.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from nanoinfer.bench.compare import Log, _interleaved

SIZES: dict[str, Any] = dict(
    vocab_size=8192,
    hidden_size=512,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    max_position_embeddings=1024,
    bos_token_id=0,
    eos_token_id=1,
    tie_word_embeddings=False,
)
EXPERTS, ACTIVE, EXPERT_WIDTH = 32, 4, 256
PROMPT, NEW_TOKENS = 32, 64


def _write_tokenizer(directory: Path) -> None:
    """A word-level tokenizer over the vocabulary (t0, t1, ...): the loader needs one."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(SIZES["vocab_size"])}, unk_token="t2"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "t0", "eos_token": "t1"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def write_models(root: Path) -> dict[str, Path]:
    """The MoE and its dense equivalent, random weights (std 0.02, as transformers initializes)."""
    import transformers

    configs = {
        "moe": transformers.Qwen3MoeConfig(
            **SIZES,
            intermediate_size=EXPERT_WIDTH * ACTIVE,
            num_experts=EXPERTS,
            num_experts_per_tok=ACTIVE,
            moe_intermediate_size=EXPERT_WIDTH,
            norm_topk_prob=True,
        ),
        "dense": transformers.Qwen3Config(**SIZES, intermediate_size=EXPERT_WIDTH * ACTIVE),
    }
    paths = {}
    for name, config in configs.items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        paths[name] = root / name
        model.save_pretrained(paths[name])
        _write_tokenizer(paths[name])
    return paths


def _decode_tok_s(llm: Any, batch: int) -> float:
    """Decode tokens/s of `batch` sequences: the time after the first token over the tokens after it."""
    from nanoinfer import SamplingParams

    llm.engine.prefix_cache.reset()
    prompts = [[10 + (7 * i + j) % 8000 for j in range(PROMPT)] for i in range(batch)]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    first = None
    for i, prompt in enumerate(prompts):
        llm.engine.add_request(f"moe-bench-{i}-{time.perf_counter_ns()}", prompt, params)
    done = 0
    while llm.engine.has_unfinished_requests():
        outputs = llm.engine.step()
        if first is None and outputs:
            first = time.perf_counter()
        done += sum(o.finished for o in outputs)
    assert first is not None and done == batch
    return batch * (NEW_TOKENS - 1) / (time.perf_counter() - first)


def _transformers_tok_s(model: Any, batch: int) -> float:
    """transformers' decode tokens/s: generate NEW_TOKENS minus generate 1, static batch."""
    ids = torch.tensor([[10 + (7 * i + j) % 8000 for j in range(PROMPT)] for i in range(batch)])

    def run(n: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - start

    return batch * (NEW_TOKENS - 1) / (run(NEW_TOKENS) - run(1))


def run_moe(args: argparse.Namespace, log: Log) -> dict[str, Any]:
    """The scenario's figures."""
    import transformers

    from nanoinfer import LLM

    with tempfile.TemporaryDirectory(prefix="nanoinfer-moe-bench-") as tmp:
        paths = write_models(Path(tmp))
        engines = {
            f"{name} {quant}": LLM(str(path), dtype="float32", quantization=quant, max_num_seqs=16)
            for quant in ("none", "int4")
            for name, path in paths.items()
        }
        hf = transformers.AutoModelForCausalLM.from_pretrained(paths["moe"], dtype=torch.float32).eval()
        figures: dict[str, dict[str, float]] = {}
        for batch in (1, 16):
            samplers = {name: partial(_decode_tok_s, llm, batch) for name, llm in engines.items()}
            if batch == 16:
                samplers["moe transformers"] = partial(_transformers_tok_s, hf, batch)
            for name, samples in _interleaved(samplers, args.repeats).items():
                figures.setdefault(name, {})[str(batch)] = statistics.median(samples)
    ratios = {
        f"moe/dense {quant} batch {b}": figures[f"moe {quant}"][b] / figures[f"dense {quant}"][b]
        for quant in ("none", "int4")
        for b in ("1", "16")
    }
    for quant in ("none", "int4"):  # transformers in float32 either way
        label = f"nanoinfer {quant}/transformers float32, moe batch 16"
        ratios[label] = figures[f"moe {quant}"]["16"] / figures["moe transformers"]["16"]
    for label, value in ratios.items():
        log(f"nanoinfer: {label} {value:.2f}x")
    return {"decode_tok_s": figures, "ratios": ratios}


def moe_markdown(result: dict[str, Any]) -> list[str]:
    """The scenario's tables."""
    f = result["decode_tok_s"]
    lines = [
        "## Mixture of experts",
        "",
        f"Decode tok/s of a qwen3_moe ({EXPERTS} experts, {ACTIVE} active, {EXPERT_WIDTH} wide) and the qwen3 "
        f"with the same active parameters (one {ACTIVE * EXPERT_WIDTH}-wide MLP); 8 layers, hidden 512, random "
        "weights; EOS ignored.",
        "",
        "| engine | batch 1 | batch 16 |",
        "|---|---:|---:|",
    ]
    for name, by_batch in f.items():
        lines.append(f"| {name} | {by_batch.get('1', 0):.1f} | {by_batch.get('16', 0):.1f} |")
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {label} | {value:.2f}× |" for label, value in result["ratios"].items()]
    return lines
