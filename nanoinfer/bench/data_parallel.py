"""The `dp` scenario: two data-parallel replicas against one engine, serving.

    python -m nanoinfer.bench.compare --scenarios dp --engines nanoinfer

The serving workload (--num-requests prompts of --input-len tokens, --output-len answers, EOS
ignored) at the largest --concurrency, through one engine with every core and through two
replicas with half the cores each (engine/data_parallel.py). Both stay loaded; the rounds
alternate them. The one engine runs its step loop on this thread, as the `serving` scenario
does; the replicas are driven by `concurrency` asyncio clients of the router, so the router,
the replicas' loop threads and their hand-offs are all in the figure. Reported: output tokens/s
of each, their ratio, and TTFT / TPOT medians.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch

from nanoinfer.bench.compare import Log, _interleaved, _range, _serving_figures, make_requests
from nanoinfer.bench.peers import NanoinferPeer


def run_data_parallel(
    base: NanoinferPeer, args: argparse.Namespace, vocab: list[int], log: Log, size: int = 2
) -> dict[str, Any]:
    """The scenario's figures; `base` is the one-engine peer (data_parallel_size 1)."""
    if base.llm.replicas is not None:
        raise ValueError("the dp scenario compares against one engine: leave --data-parallel-size at 1")
    cores = torch.get_num_threads()
    concurrency = max(int(c) for c in args.concurrency.split(","))
    replicas = NanoinferPeer(base.model, base.dtype, **{**base.kwargs, "data_parallel_size": size})
    per_replica = torch.get_num_threads()  # what the replicas set
    requests = make_requests(vocab, args.num_requests, _range(args.input_len), _range(args.output_len))
    warm = make_requests(vocab, 2, (16, 32), (4, 8), seed=9)

    def one_engine() -> dict[str, float]:
        torch.set_num_threads(cores)  # this thread steps the engine
        return _serving_figures(base.serve(requests, concurrency))

    def warm_one() -> Any:
        torch.set_num_threads(cores)
        return base.serve(warm, concurrency)

    samplers = {"dp1": one_engine, f"dp{size}": lambda: _serving_figures(replicas.serve(requests, concurrency))}
    warmups = {"dp1": warm_one, f"dp{size}": lambda: replicas.serve(warm, concurrency)}
    try:
        samples = _interleaved(samplers, max(args.repeats, 3), warmups)
    finally:
        replicas.llm.shutdown()
        torch.set_num_threads(cores)
    figures = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in samples.items()}
    ratio = figures[f"dp{size}"]["output_tok_s"] / figures["dp1"]["output_tok_s"]
    log(
        f"nanoinfer: serving c={concurrency}: one engine ({cores} threads) {figures['dp1']['output_tok_s']:.1f} "
        f"out tok/s, DP={size} ({per_replica} per replica) {figures[f'dp{size}']['output_tok_s']:.1f} ({ratio:.2f}x)"
    )
    return {
        "cores": cores,
        "threads_per_replica": per_replica,
        "replicas": size,
        "concurrency": concurrency,
        "requests": len(requests),
        "figures": figures,
        "ratio": ratio,
        "samples": samples,
    }


def data_parallel_markdown(result: dict[str, Any]) -> list[str]:
    """The scenario's table."""
    size = result["replicas"]
    lines = [
        "## Data parallelism",
        "",
        f"{result['requests']} serving requests at concurrency {result['concurrency']}: one engine with "
        f"{result['cores']} threads against {size} replicas with {result['threads_per_replica']} each.",
        "",
        "| engine | output tok/s | TTFT p50 (s) | TPOT p50 (ms) | samples (tok/s) |",
        "|---|---:|---:|---:|---|",
    ]
    for name, label in (("dp1", "one engine"), (f"dp{size}", f"DP={size}")):
        f = result["figures"][name]
        runs = ", ".join(f"{r['output_tok_s']:.1f}" for r in result["samples"][name])
        lines.append(
            f"| {label} | {f['output_tok_s']:.1f} | {f['ttft_p50']:.2f} | {f['tpot_p50'] * 1000:.1f} | {runs} |"
        )
    lines += ["", f"DP={size} / one engine: {result['ratio']:.2f}×"]
    return lines
