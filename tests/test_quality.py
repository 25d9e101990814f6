"""Weight formats must not silently cost quality, scored on the shipped text with the real model."""

from __future__ import annotations

import torch

from nanoinfer.bench.quality import score_formats


def test_quality_targets_hold():
    # 768 tokens keep this under a minute; `nanoinfer bench --quality` scores the whole text.
    results = score_formats(
        "smollm2-135m-instruct",
        max_tokens=768,
        formats=(
            ("float32", "float32", "none", torch.float32),
            ("bfloat16", "bfloat16", "none", torch.float32),
            ("int4", "bfloat16", "int4", torch.float32),
            ("float16 KV", "float32", "none", torch.float16),
        ),
    )
    base = results["float32"]["perplexity"]
    # serving's default float16 cache (on CPU): measured +0.003% and 99.96% on the whole text
    assert abs(results["float16 KV"]["perplexity"] / base - 1) < 0.001, results
    assert results["float16 KV"]["top1_agreement"] >= 0.995, results
    assert results["int4"]["perplexity"] <= base * 1.05, results
    assert results["bfloat16"]["top1_agreement"] >= 0.99, results
    # The int4 layers requantize the GGUF's Q4_1 groups and the head its Q8_0 groups without loss;
    # what remains is the kernel's int8 rounding of activations (per group of 32, as llama.cpp's
    # Q8_1): 97-98% here. Before its min term used the same rounded activations it was 93%.
    assert results["int4"]["top1_agreement"] >= 0.96, results
