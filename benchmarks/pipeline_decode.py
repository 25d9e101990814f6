"""Decode speed of the default model on one rank and over two pipeline stages, alternating.

    .venv/bin/python benchmarks/pipeline_decode.py

(Two model-parallel engines cannot share one process, so this is not a `make bench` scenario:
each round starts its engine afresh.) Prints output tokens/s at batch 1 and 16 per round, and
whether the two engines' greedy tokens agree.
"""

from __future__ import annotations

import statistics
import time

from nanoinfer import LLM, SamplingParams

PROMPT = "Write a long story about a lighthouse keeper and the sea."
TOKENS, ROUNDS = 64, 3


def measure(pp: int) -> tuple[dict[int, float], list[list[int]]]:
    llm = LLM(pipeline_parallel_size=pp, max_model_len=1024)
    try:
        params = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)
        llm.generate(["Hi"], params)  # warm-up
        speed, tokens = {}, []
        for batch in (1, 16):
            start = time.perf_counter()
            out = llm.generate([PROMPT] * batch, params)
            speed[batch] = batch * TOKENS / (time.perf_counter() - start)
            tokens = [list(r.outputs[0].token_ids) for r in out]
        return speed, tokens
    finally:
        llm.engine.shutdown()


def main() -> None:
    runs: dict[int, list[dict[int, float]]] = {1: [], 2: []}
    same = True
    for _ in range(ROUNDS):
        one, tokens_one = measure(1)
        two, tokens_two = measure(2)
        runs[1].append(one)
        runs[2].append(two)
        same = same and tokens_one == tokens_two
    for batch in (1, 16):
        a = statistics.median(r[batch] for r in runs[1])
        b = statistics.median(r[batch] for r in runs[2])
        print(f"batch {batch}: PP=1 {a:.1f} tok/s, PP=2 {b:.1f} tok/s ({b / a:.2f}x)")
    print("same greedy tokens:", same)


if __name__ == "__main__":
    main()
