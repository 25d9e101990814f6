"""nanoinfer vs transformers vs llama-cpp-python on one model, in one run.

    python -m benchmarks.compare            # or: nanoinfer bench / make bench

Writes benchmarks/results/latest.{json,md,png}. Every figure is the median of --repeats runs after
a warm-up; the JSON keeps every raw sample and the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.peers import LlamaCppPeer, NanoinferPeer, Request, RequestTiming, TransformersPeer
from nanoinfer.config import KV_CACHE_DTYPES

RESULTS = Path(__file__).parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nanoinfer bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="built-in name, .gguf file or HF directory")
    p.add_argument("--engines", default="nanoinfer,transformers,llama.cpp")
    p.add_argument("--dtype", default=None, help="nanoinfer --dtype (default: the fastest measured)")
    p.add_argument("--quantization", default=None, choices=["none", "int8", "int4"],
                   help="nanoinfer weight format (default: the model's default)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="nanoinfer KV cache storage (default auto: float16 on CPU)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--input-len", default="128,512", help="uniform range of serving prompt lengths")
    p.add_argument("--output-len", default="64,256", help="uniform range of serving output lengths")
    p.add_argument("--prefix-requests", type=int, default=32)
    p.add_argument("--prefix-len", type=int, default=1024)
    p.add_argument("--scenarios", default="pp512,tg128,serving,shared_prefix")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--quality", action="store_true", help="report perplexity / top-1 agreement per format instead")
    return p.parse_args(argv)


def _range(text: str) -> tuple[int, int]:
    lo, hi = (int(x) for x in text.split(","))
    return lo, hi


def _median_after_warmup(fn, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up: first-call allocations, lazy initialisation, caches
    samples = [fn() for _ in range(repeats)]
    return statistics.median(samples), samples


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def _serving_figures(timings: list[RequestTiming]) -> dict[str, float]:
    span = max(t.finish for t in timings) - min(t.submit for t in timings)
    ttft = [t.ttft for t in timings]
    tpot = [t.tpot for t in timings]
    return {
        "output_tok_s": sum(t.output_len for t in timings) / span,
        "ttft_p50": _percentile(ttft, 50), "ttft_p99": _percentile(ttft, 99),
        "tpot_p50": _percentile(tpot, 50), "tpot_p99": _percentile(tpot, 99),
    }


def make_requests(vocab: list[int], n: int, input_len: tuple[int, int], output_len: tuple[int, int], seed: int = 0) -> list[Request]:
    rng = random.Random(seed)
    return [Request([rng.choice(vocab) for _ in range(rng.randint(*input_len))], rng.randint(*output_len)) for _ in range(n)]


def run_peer(peer, args: argparse.Namespace, vocab: list[int], log) -> dict[str, Any]:
    """Every scenario for one engine; figures plus raw samples."""
    scenarios = set(args.scenarios.split(","))
    rng = random.Random(1)
    result: dict[str, Any] = {"engine": peer.name, "info": peer.describe()}
    if "pp512" in scenarios:
        ids = [rng.choice(vocab) for _ in range(512)]
        median, samples = _median_after_warmup(lambda: peer.prefill(ids), args.repeats)
        result["pp512"] = {"tok_s": 512 / median, "samples_s": samples}
        log(f"{peer.name}: pp512 {512 / median:.1f} tok/s")
    if "tg128" in scenarios:
        ids = [rng.choice(vocab) for _ in range(16)]
        median, samples = _median_after_warmup(lambda: peer.decode(ids, 128), args.repeats)
        result["tg128"] = {"tok_s": 128 / median, "samples_s": samples}
        log(f"{peer.name}: tg128 {128 / median:.1f} tok/s")
    if "serving" in scenarios:
        requests = make_requests(vocab, args.num_requests, _range(args.input_len), _range(args.output_len))
        warm = make_requests(vocab, 2, (16, 32), (4, 8), seed=9)
        result["serving"] = {}
        for c in (int(x) for x in args.concurrency.split(",")):
            peer.serve(warm, c)
            runs = [_serving_figures(peer.serve(requests, c)) for _ in range(args.repeats)]
            figures = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            result["serving"][str(c)] = {**figures, "samples": runs}
            log(f"{peer.name}: serving c={c} {figures['output_tok_s']:.1f} out tok/s, "
                f"TTFT p50 {figures['ttft_p50'] * 1000:.0f} ms, TPOT p50 {figures['tpot_p50'] * 1000:.1f} ms")
    if "shared_prefix" in scenarios and isinstance(peer, NanoinferPeer):
        result["shared_prefix"] = shared_prefix(peer, args, vocab, log)
    return result


def shared_prefix(peer: NanoinferPeer, args: argparse.Namespace, vocab: list[int], log) -> dict[str, Any]:
    """Mean TTFT of requests sharing a long system prompt, prefix cache on vs off."""
    rng = random.Random(2)
    system = [rng.choice(vocab) for _ in range(args.prefix_len)]
    requests = [Request(system + [rng.choice(vocab) for _ in range(rng.randint(8, 24))], 8) for _ in range(args.prefix_requests)]
    out: dict[str, Any] = {}
    for label, enabled in (("cache_off", False), ("cache_on", True)):
        peer.reconfigure(enable_prefix_cache=enabled)
        # warm-up; with the cache on the system prompt is now cached, as on a server that has seen it
        peer.serve(requests[:1], 1, fresh_cache=False)
        runs = []
        for _ in range(args.repeats):
            timings = peer.serve(requests, args.prefix_requests, fresh_cache=False)
            runs.append(statistics.mean(t.ttft for t in timings))
        out[label] = {"mean_ttft_s": statistics.median(runs), "samples": runs}
    peer.reconfigure()
    out["speedup"] = out["cache_off"]["mean_ttft_s"] / out["cache_on"]["mean_ttft_s"]
    log(f"nanoinfer: shared prefix mean TTFT off {out['cache_off']['mean_ttft_s'] * 1000:.0f} ms, "
        f"on {out['cache_on']['mean_ttft_s'] * 1000:.0f} ms ({out['speedup']:.1f}x)")
    return out


def machine_info(threads: int) -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quality:
        from benchmarks.quality import main as quality_main

        return quality_main(args)
    torch.set_num_threads(args.threads)
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    from nanoinfer.loading import resolve_model_path

    model_path = resolve_model_path(args.model)
    engines = args.engines.split(",")
    nano_kwargs: dict[str, Any] = {"max_num_seqs": max(int(c) for c in args.concurrency.split(",")),
                                   "kv_cache_dtype": args.kv_cache_dtype}
    nano = NanoinferPeer(args.model, dtype=args.dtype or "float32", quantization=args.quantization, **nano_kwargs)
    vocab = list(range(1000, min(nano.engine.model_config.vocab_size, 20000)))  # ordinary tokens, no specials
    results: dict[str, Any] = {"model": args.model, "model_path": str(model_path), "machine": machine_info(args.threads),
                               "settings": {k: str(v) for k, v in vars(args).items()}, "engines": {}}
    results["engines"]["nanoinfer"] = run_peer(nano, args, vocab, log)
    del nano
    if "llama.cpp" in engines:
        if model_path.suffix != ".gguf":
            log("llama.cpp skipped: it needs a .gguf model")
        else:
            results["engines"]["llama.cpp"] = run_peer(LlamaCppPeer(model_path, args.threads), args, vocab, log)
    if "transformers" in engines:
        results["engines"]["transformers"] = run_peer(TransformersPeer(model_path), args, vocab, log)
    from benchmarks.report import write_reports

    paths = write_reports(results, args.out)
    print(Path(paths["md"]).read_text())
    log("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
