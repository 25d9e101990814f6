"""The `tp` scenario: what tensor parallelism costs in communication on this machine.

    python -m nanoinfer.bench.compare --scenarios tp --engines nanoinfer

The model (the default one unless --model says otherwise) decodes at batch 1 and at batch 16 on
one rank with every core, and on two ranks with half the cores each (a worker process next to
this one, the per-layer sums in shared memory). Both engines stay loaded; the rounds alternate
them and set this process's thread count to each one's. Reported: output tokens/s of each, their
ratio, and the time rank 0 spends in the exchange per decode step (waiting for the other rank
included, so load imbalance shows up here too).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from nanoinfer.bench.compare import Log, _interleaved

DECODE_TOKENS = 64
PROMPT = "Write a long story about a lighthouse keeper and the sea."


def _sampler(llm: Any, threads: int, batch: int) -> Any:
    from nanoinfer.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=DECODE_TOKENS, temperature=0, ignore_eos=True)
    group = llm.engine.model_parallel

    def sample() -> dict[str, float]:
        torch.set_num_threads(threads)
        comm_before = group.comm.seconds if group is not None else 0.0
        start = time.perf_counter()
        llm.generate([PROMPT] * batch, params)
        elapsed = time.perf_counter() - start
        comm = (group.comm.seconds - comm_before) if group is not None else 0.0
        return {"tok_s": batch * DECODE_TOKENS / elapsed, "comm_ms_per_step": 1000 * comm / DECODE_TOKENS}

    return sample


def run_parallel(args: argparse.Namespace, log: Log) -> dict[str, Any]:
    """The scenario's figures."""
    from nanoinfer.llm import LLM

    cores = torch.get_num_threads()
    model = args.model
    engines = {"tp1": LLM(model, max_model_len=512), "tp2": LLM(model, max_model_len=512, tensor_parallel_size=2)}
    per_rank = torch.get_num_threads()  # what the two-rank engine set for its ranks
    out: dict[str, Any] = {"cores": cores, "threads_per_rank": per_rank, "model": model}
    try:
        for batch in (1, 16):
            samplers = {
                "tp1": _sampler(engines["tp1"], cores, batch),
                "tp2": _sampler(engines["tp2"], per_rank, batch),
            }
            samples = _interleaved(samplers, max(args.repeats, 3))
            tok_s = {name: statistics.median(s["tok_s"] for s in runs) for name, runs in samples.items()}
            comm_ms = statistics.median(s["comm_ms_per_step"] for s in samples["tp2"])
            ratio = tok_s["tp2"] / tok_s["tp1"]
            out[f"batch{batch}"] = {"tok_s": tok_s, "tp2_over_tp1": ratio, "comm_ms_per_step": comm_ms}
            log(
                f"nanoinfer: decode batch {batch}: TP=1 ({cores} threads) {tok_s['tp1']:.1f} tok/s, TP=2 "
                f"({per_rank} per rank) {tok_s['tp2']:.1f} tok/s ({ratio:.2f}x), exchange {comm_ms:.2f} ms/step"
            )
    finally:
        engines["tp2"].engine.shutdown()
        torch.set_num_threads(cores)
    return out


def parallel_markdown(result: dict[str, Any]) -> list[str]:
    """The scenario's table."""
    lines = [
        "## Tensor parallelism",
        "",
        f"{result['model']} decoding {DECODE_TOKENS} tokens: one rank with {result['cores']} threads against two "
        f"ranks with {result['threads_per_rank']} each (exchange: rank 0's time in the per-layer sums and the "
        "step broadcast, waiting included).",
        "",
        "| batch | TP=1 tok/s | TP=2 tok/s | TP=2 / TP=1 | exchange ms per step |",
        "|---:|---:|---:|---:|---:|",
    ]
    for batch in (1, 16):
        r = result[f"batch{batch}"]
        lines.append(
            f"| {batch} | {r['tok_s']['tp1']:.1f} | {r['tok_s']['tp2']:.1f} | {r['tp2_over_tp1']:.2f}× "
            f"| {r['comm_ms_per_step']:.2f} |"
        )
    return lines
