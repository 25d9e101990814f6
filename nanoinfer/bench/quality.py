"""Quality per weight format: perplexity on a fixed text, and greedy top-1 agreement with float32.

    nanoinfer bench --quality [--model M]

The text (nanoinfer/bench/data/quality.txt, written for this project) is scored in one forward pass
per format; agreement counts the positions whose argmax equals float32's.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch

TEXT = Path(__file__).parent / "data" / "quality.txt"
# (label, --dtype, --quantization, KV cache dtype); on CPU --dtype bfloat16 stores float weights
# in bf16 and keeps activations float32 (nanoinfer/quant/half.py). Weight formats are scored with
# a float32 cache, so they are compared alone; the last row is what serving's default float16
# cache costs on its own.
FORMATS = (
    ("float32", "float32", "none", torch.float32),
    ("bfloat16", "bfloat16", "none", torch.float32),
    ("int8", "float32", "int8", torch.float32),
    ("int4", "float32", "int4", torch.float32),
    ("float16 KV cache", "float32", "none", torch.float16),
)


def perplexity(llm: Any, ids: list[int], kv_dtype: torch.dtype | None = None) -> tuple[float, torch.Tensor]:
    """The perplexity of `ids` under an LLM's model, and its argmax at each position."""
    logits = llm.engine.model.score(ids, kv_dtype)[:-1].float()
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).item()
    return math.exp(nll), logits.argmax(-1)


def text_ids(llm: Any, max_tokens: int | None = None) -> list[int]:
    """quality.txt as the LLM's tokenizer encodes it."""
    return llm.tokenizer.encode(TEXT.read_text(), add_special_tokens=True)[:max_tokens]


def score_formats(model: str, max_tokens: int | None = None, formats=FORMATS) -> dict[str, dict[str, float]]:
    """{label: {"perplexity", "top1_agreement", "tokens"}} for each format."""
    from nanoinfer import LLM

    results: dict[str, dict[str, float]] = {}
    reference: torch.Tensor | None = None
    ids: list[int] = []
    for label, dtype, quantization, kv_dtype in formats:
        llm = LLM(model, dtype=dtype, quantization=quantization, max_num_seqs=1)
        if not ids:
            ids = text_ids(llm, max_tokens)
        ppl, top1 = perplexity(llm, ids, kv_dtype)
        if reference is None:
            reference = top1
        results[label] = {
            "perplexity": ppl,
            "top1_agreement": (top1 == reference).float().mean().item(),
            "tokens": len(ids),
        }
        del llm
    return results


def main(model: str) -> int:
    results = score_formats(model)
    base = results["float32"]["perplexity"]
    print("| format | perplexity | vs float32 | top-1 agreement with float32 |\n|---|---:|---:|---:|")
    for label, r in results.items():
        print(
            f"| {label} | {r['perplexity']:.3f} | {100 * (r['perplexity'] / base - 1):+.2f}% | "
            f"{100 * r['top1_agreement']:.2f}% |"
        )
    print(f"\n{results['float32']['tokens']} tokens of {TEXT.name}, model {model}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    sys.exit(main(parser.parse_args().model))
