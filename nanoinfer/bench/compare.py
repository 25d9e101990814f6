"""nanoinfer vs transformers vs llama-cpp-python on one model, in one run.

    python -m nanoinfer.bench.compare       # or: nanoinfer bench / make bench

Writes benchmarks/results/latest.{json,md,png} under the current directory (--out). Every figure
is the median of --repeats runs after a warm-up; the JSON keeps every raw sample and the machine it
ran on. The recorded runs, and the command behind each: docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch

from nanoinfer.bench.peers import LlamaCppPeer, NanoinferPeer, Request, RequestTiming, TransformersPeer
from nanoinfer.config import KV_CACHE_DTYPES

RESULTS = Path("benchmarks") / "results"  # relative to where it runs: the repository root for make bench

Log = Callable[[str], None]
K = TypeVar("K")
# The spec scenario's default settings besides its baseline: vLLM's n-gram prompt lookup.
SPEC_CONFIGS = (
    '[{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2},'
    ' {"method": "ngram", "num_speculative_tokens": 8, "prompt_lookup_max": 4, "prompt_lookup_min": 2}]'
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="nanoinfer bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m-instruct", help="built-in name, .gguf file or HF directory")
    p.add_argument("--engines", default="nanoinfer,transformers,llama.cpp")
    p.add_argument("--dtype", default=None, help="nanoinfer --dtype (default: the fastest measured)")
    p.add_argument(
        "--quantization",
        default=None,
        choices=["none", "int8", "int4"],
        help="nanoinfer weight format (default: the model's default)",
    )
    p.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=KV_CACHE_DTYPES,
        help="nanoinfer KV cache storage (default auto: float16 on CPU)",
    )
    p.add_argument("--speculative-config", default=None, metavar="JSON", help="nanoinfer speculative decoding")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--input-len", default="128,512", help="uniform range of serving prompt lengths")
    p.add_argument("--output-len", default="64,256", help="uniform range of serving output lengths")
    p.add_argument("--prefix-requests", type=int, default=32)
    p.add_argument("--prefix-len", type=int, default=1024)
    p.add_argument(
        "--scenarios",
        default="pp512,tg128,serving,http,shared_prefix,lora,moe,mla,tp,dp",
        help="http, lora, moe, mla, tp, dp: see http_serving.py, lora.py, moe.py, mla.py, parallel.py, "
        "data_parallel.py; also spec (spec.py), structured (structured.py)",
    )
    p.add_argument(
        "--http-peers",
        default="llama-server,vllm",
        help="http: servers beside `nanoinfer serve` (a missing one is reported with its error)",
    )
    p.add_argument(
        "--data-parallel-size",
        "-dp",
        type=int,
        default=1,
        help="nanoinfer engine replicas (pp512, tg128 and serving; other scenarios drive one engine)",
    )
    p.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        default=1,
        help="nanoinfer split over this many ranks (pp512, tg128 and serving; the tp scenario compares 1 and 2)",
    )
    p.add_argument(
        "--pipeline-parallel-size",
        "-pp",
        type=int,
        default=1,
        help="nanoinfer split into this many pipeline stages (pp512, tg128 and serving)",
    )
    p.add_argument("--structured-concurrency", type=int, default=16, help="structured: serving clients")
    p.add_argument("--structured-requests", type=int, default=32, help="structured: serving requests")
    p.add_argument("--structured-max-tokens", type=int, default=96, help="structured: answer budget")
    p.add_argument("--lora-batch-size", type=int, default=8, help="lora: training sequences per step")
    p.add_argument("--lora-adapters", type=int, default=4, help="lora: distinct adapters served at once")
    p.add_argument("--lora-concurrency", type=int, default=16, help="lora: serving clients")
    p.add_argument("--lora-requests", type=int, default=32, help="lora: serving requests")
    p.add_argument(
        "--spec-configs",
        default=SPEC_CONFIGS,
        metavar="JSON",
        help="spec: a JSON list of nanoinfer speculative_config objects; a baseline without speculation always runs",
    )
    p.add_argument("--spec-workloads", type=Path, default=None, help="spec: JSON {set: [user messages]}")
    p.add_argument("--spec-prompts", type=int, default=None, metavar="N", help="spec: the first N prompts of each set")
    p.add_argument("--spec-max-tokens", type=int, default=128, help="spec: greedy answers stop at EOS or here")
    p.add_argument("--spec-concurrency", type=int, default=16, help="spec: serving clients (0: batch 1 only)")
    p.add_argument("--spec-requests", type=int, default=64, help="spec: serving requests per set")
    p.add_argument("--spec-lookup-tokens", type=int, default=10, help="spec: transformers/llama.cpp prompt lookup k")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--quality", action="store_true", help="report perplexity / top-1 agreement per format instead")
    return p.parse_args(argv)


def _range(text: str) -> tuple[int, int]:
    lo, hi = (int(x) for x in text.split(","))
    return lo, hi


def round_order(names: list[K], r: int) -> list[K]:
    """Round r's order: forward in even rounds, backward in odd ones (A B C, C B A, ...), so no
    engine always runs first, after the same neighbour, or at the same point of a drift."""
    return names if r % 2 == 0 else names[::-1]


def _interleaved(
    samplers: Mapping[K, Callable[[], Any]], repeats: int, warmups: Mapping[K, Callable[[], Any]] | None = None
) -> dict[K, list[Any]]:
    """Each engine's samples, taken in rounds that run every engine once in turn after one warm-up
    each (the sampler itself unless `warmups` gives a cheaper call). This shared machine's speed
    drifts (docs/performance.md, "Limits of this machine"); in rounds the engines share each
    stretch of it, so the drift moves them together instead of skewing the ratios, as one
    engine's runs after another's would; the rounds alternate direction (round_order)."""
    for name in samplers:
        (warmups or samplers)[name]()
    samples: dict[K, list[Any]] = {name: [] for name in samplers}
    for r in range(repeats):
        for name in round_order(list(samplers), r):
            samples[name].append(samplers[name]())
    return samples


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def _serving_sample(peer: Any, requests: list[Request], concurrency: int) -> dict[str, float]:
    return _serving_figures(peer.serve(requests, concurrency))


def _serving_figures(timings: list[RequestTiming]) -> dict[str, float]:
    span = max(t.finish for t in timings) - min(t.submit for t in timings)
    ttft = [t.ttft for t in timings]
    tpot = [t.tpot for t in timings]
    return {
        "output_tok_s": sum(t.output_len for t in timings) / span,
        "ttft_p50": _percentile(ttft, 50),
        "ttft_p99": _percentile(ttft, 99),
        "tpot_p50": _percentile(tpot, 50),
        "tpot_p99": _percentile(tpot, 99),
    }


def make_requests(
    vocab: list[int], n: int, input_len: tuple[int, int], output_len: tuple[int, int], seed: int = 0
) -> list[Request]:
    rng = random.Random(seed)
    return [
        Request([rng.choice(vocab) for _ in range(rng.randint(*input_len))], rng.randint(*output_len)) for _ in range(n)
    ]


def _tokens_per_s(
    results: dict[str, Any],
    label: str,
    tokens: int,
    samplers: dict[str, Callable[[], float]],
    args: argparse.Namespace,
    log: Log,
) -> None:
    """results[engine][label]: `tokens` over the median of the samplers' seconds, interleaved."""
    for name, samples in _interleaved(samplers, args.repeats).items():
        results[name][label] = {"tok_s": tokens / statistics.median(samples), "samples_s": samples}
        log(f"{name}: {label} {results[name][label]['tok_s']:.1f} tok/s")


def run_engines(peers: dict[str, Any], args: argparse.Namespace, vocab: list[int], log: Log) -> dict[str, Any]:
    """Every scenario for every engine, the engines interleaved (see _interleaved); figures plus raw samples."""
    scenarios = set(args.scenarios.split(","))
    rng = random.Random(1)
    results: dict[str, Any] = {name: {"engine": name, "info": peer.describe()} for name, peer in peers.items()}
    if "pp512" in scenarios:
        ids = [rng.choice(vocab) for _ in range(512)]
        _tokens_per_s(results, "pp512", 512, {name: partial(p.prefill, ids) for name, p in peers.items()}, args, log)
    if "tg128" in scenarios:
        ids = [rng.choice(vocab) for _ in range(16)]
        _tokens_per_s(
            results, "tg128", 128, {name: partial(p.decode, ids, 128) for name, p in peers.items()}, args, log
        )
        if isinstance(peers.get("nanoinfer"), NanoinferPeer):
            results["nanoinfer"]["bandwidth"] = _bandwidth_bound(peers["nanoinfer"], results, log)
    if "serving" in scenarios:
        requests = make_requests(vocab, args.num_requests, _range(args.input_len), _range(args.output_len))
        warm = make_requests(vocab, 2, (16, 32), (4, 8), seed=9)
        for c in (int(x) for x in args.concurrency.split(",")):
            samplers = {name: partial(_serving_sample, p, requests, c) for name, p in peers.items()}
            warmups = {name: partial(p.serve, warm, c) for name, p in peers.items()}
            for name, runs in _interleaved(samplers, args.repeats, warmups).items():
                figures = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                results[name].setdefault("serving", {})[str(c)] = {**figures, "samples": runs}
                log(
                    f"{name}: serving c={c} {figures['output_tok_s']:.1f} out tok/s, "
                    f"TTFT p50 {figures['ttft_p50'] * 1000:.0f} ms, TPOT p50 {figures['tpot_p50'] * 1000:.1f} ms"
                )
    nano = peers.get("nanoinfer")
    if "http" in scenarios and isinstance(nano, NanoinferPeer):
        from nanoinfer.bench.http_serving import run_http  # it imports this module
        from nanoinfer.loading import resolve_model_path

        path = resolve_model_path(args.model)
        requests = make_requests(vocab, args.num_requests, _range(args.input_len), _range(args.output_len))
        gguf = path if path.suffix == ".gguf" else None
        warmup = make_requests(vocab, args.num_requests, (16, 32), (4, 8), seed=9)  # never the measured set
        results["nanoinfer"]["http"] = run_http(args, gguf, requests, warmup, log, args.http_peers.split(","))
    if "shared_prefix" in scenarios and isinstance(nano, NanoinferPeer):
        results["nanoinfer"]["shared_prefix"] = shared_prefix(nano, args, vocab, log)
    if "spec" in scenarios:
        from nanoinfer.bench.spec import run_spec  # it imports this module

        for name, spec in run_spec(peers, args, log).items():
            results[name]["spec"] = spec
    if "structured" in scenarios and isinstance(nano, NanoinferPeer):
        from nanoinfer.bench.structured import run_structured  # it imports this module

        results["nanoinfer"]["structured"] = run_structured(nano, args, log)
    if "mla" in scenarios:
        from nanoinfer.bench.mla import run_mla  # it imports this module

        results["nanoinfer"]["mla"] = run_mla(args, log)
    if "tp" in scenarios:
        from nanoinfer.bench.parallel import run_parallel  # it imports this module

        results["nanoinfer"]["tp"] = run_parallel(args, log)
    if "dp" in scenarios and isinstance(nano, NanoinferPeer):
        from nanoinfer.bench.data_parallel import run_data_parallel  # it imports this module

        results["nanoinfer"]["dp"] = run_data_parallel(nano, args, vocab, log)
    if "moe" in scenarios:
        from nanoinfer.bench.moe import run_moe  # it imports this module

        results["nanoinfer"]["moe"] = run_moe(args, log)
    if "lora" in scenarios and isinstance(nano, NanoinferPeer):
        from nanoinfer.bench.lora import run_lora  # it imports this module

        results["nanoinfer"]["lora"] = run_lora(nano, args, vocab, log)
    return results


def _bandwidth_bound(peer: NanoinferPeer, results: dict[str, Any], log: Log) -> dict[str, float]:
    """tg128 of our engine against what the machine's read bandwidth allows (see bandwidth.py)."""
    from nanoinfer.bench.bandwidth import decode_bound, read_bandwidth
    from nanoinfer.quant import weight_bytes

    model = peer.engine.model
    read = weight_bytes(model)
    if model.lm_head is not None and model.embed is not None:  # the table is looked up, one row a token
        read -= model.embed.weight.nbytes
    bound = decode_bound(read, results["nanoinfer"]["tg128"]["tok_s"], read_bandwidth())
    log(
        f"nanoinfer: read bandwidth {bound['read_gb_s']:.1f} GB/s, {bound['weight_bytes'] / 2**20:.1f} MiB of weights "
        "read per token: "
        f"tg128 is {100 * bound['fraction_of_bound']:.0f}% of the {bound['bound_tok_s']:.0f} tok/s bound"
    )
    return bound


def shared_prefix(peer: NanoinferPeer, args: argparse.Namespace, vocab: list[int], log: Log) -> dict[str, Any]:
    """Mean TTFT of requests sharing a long system prompt, prefix cache on vs off."""
    rng = random.Random(2)
    system = [rng.choice(vocab) for _ in range(args.prefix_len)]
    requests = [
        Request(system + [rng.choice(vocab) for _ in range(rng.randint(8, 24))], 8) for _ in range(args.prefix_requests)
    ]
    out: dict[str, Any] = {}
    for label, enabled in (("cache_off", False), ("cache_on", True)):
        peer.reconfigure(enable_prefix_cache=enabled)
        # warm-up; with the cache on the system prompt is now cached, as on a server that has seen it
        peer.serve(requests[:1], 1, fresh_cache=False)
        runs: list[float] = []
        for _ in range(args.repeats):
            timings = peer.serve(requests, args.prefix_requests, fresh_cache=False)
            runs.append(statistics.mean(t.ttft for t in timings))
        out[label] = {"mean_ttft_s": statistics.median(runs), "samples": runs}
    peer.reconfigure()
    out["speedup"] = out["cache_off"]["mean_ttft_s"] / out["cache_on"]["mean_ttft_s"]
    log(
        f"nanoinfer: shared prefix mean TTFT off {out['cache_off']['mean_ttft_s'] * 1000:.0f} ms, "
        f"on {out['cache_on']['mean_ttft_s'] * 1000:.0f} ms ({out['speedup']:.1f}x)"
    )
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
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quality:
        from nanoinfer.bench.quality import main as quality_main

        return quality_main(args.model)
    torch.set_num_threads(args.threads)
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    from nanoinfer.loading import resolve_model_path

    model_path = resolve_model_path(args.model)
    engines = args.engines.split(",")
    nano_kwargs: dict[str, Any] = {
        "max_num_seqs": max(int(c) for c in args.concurrency.split(",")),
        "kv_cache_dtype": args.kv_cache_dtype,
        "speculative_config": args.speculative_config,
    }
    for flag in ("data_parallel_size", "tensor_parallel_size", "pipeline_parallel_size"):
        if getattr(args, flag) <= 1:
            continue
        # these scenarios build engines of their own, or drive one engine's internals
        one_engine = {"shared_prefix", "spec", "structured", "lora", "dp", "tp"} & set(args.scenarios.split(","))
        if one_engine:
            option = "--" + flag.replace("_", "-")
            raise SystemExit(f"{option} > 1 runs pp512, tg128 and serving only, not {sorted(one_engine)}")
        nano_kwargs[flag] = getattr(args, flag)
    nano = NanoinferPeer(args.model, dtype=args.dtype or "auto", quantization=args.quantization, **nano_kwargs)
    size = nano.engine.model_config.vocab_size
    vocab = list(range(min(1000, size // 2), min(size, 20000)))  # ordinary tokens, no specials (tiny vocabularies too)
    results: dict[str, Any] = {
        "model": args.model,
        "model_path": str(model_path),
        "machine": machine_info(args.threads),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "engines": {},
    }
    peers: dict[str, Any] = {"nanoinfer": nano}  # all loaded at once: their runs are interleaved
    if "llama.cpp" in engines:
        if model_path.suffix != ".gguf":
            log("llama.cpp skipped: it needs a .gguf model")
        else:
            peers["llama.cpp"] = LlamaCppPeer(model_path, args.threads)
    if "transformers" in engines:
        peers["transformers"] = TransformersPeer(model_path)
    results["engines"] = run_engines(peers, args, vocab, log)
    from nanoinfer.bench.report import write_reports

    paths = write_reports(results, args.out)
    print(Path(paths["md"]).read_text())
    log("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
