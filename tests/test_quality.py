"""Quantization must not silently cost quality: perplexity of each weight format on the shipped text."""

from __future__ import annotations

from benchmarks.quality import score_formats


def test_int4_perplexity_within_5_percent_of_float32():
    # 768 tokens keep this under a minute; `nanoinfer bench --quality` scores the whole text.
    results = score_formats("smollm2-135m-instruct", max_tokens=768,
                            formats=(("float32", "float32", "none"), ("int4", "bfloat16", "int4")))
    base = results["float32"]["perplexity"]
    assert results["int4"]["perplexity"] <= base * 1.05, results
