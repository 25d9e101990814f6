"""The `spec` scenario: what speculative decoding buys, on answers that copy their prompt and on
answers that do not.

    python -m nanoinfer.bench.compare --scenarios spec [--spec-configs JSON]

nanoinfer runs once with speculation off (the baseline) and once per --spec-configs entry, every
engine loaded up front. Its settings run in lockstep, one engine step each in turn, each timed by
its own steps only (`run_in_lockstep`), in --repeats rounds. Batch 1: greedy chat answers of up to
--spec-max-tokens tokens, one prompt at a time, decode tok/s after the first token, draft
acceptance and tokens per target forward from the engine's counters and outputs, and whether the
answers equal the baseline's (speculation is lossless, so they must). Concurrency
--spec-concurrency: the same prompts, repeated to --spec-requests, served with the baseline's
answer lengths. transformers (and llama.cpp when selected) run their own prompt lookup beside
their plain greedy decode on the same batch-1 prompts, in rounds (compare._interleaved).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from nanoinfer.bench.compare import Log, _interleaved, round_order
from nanoinfer.bench.peers import ClosedLoop, Completion, LlamaCppPeer, NanoinferPeer, Request, TransformersPeer

WORKLOADS = Path(__file__).parent / "data" / "spec_workloads.json"
BASELINE = "baseline"
# Room for the longest shipped chat prompt and its answer: one engine per setting is loaded at
# once, and a pool sized for the model's whole window would be gigabytes each.
MAX_MODEL_LEN = 2048

Sample = dict[str, Any]


def load_workloads(path: Path | None = None, limit: int | None = None) -> dict[str, list[str]]:
    """{set name: user messages}; the shipped sets unless `path` names others."""
    sets: dict[str, list[str]] = json.loads((path or WORKLOADS).read_text())
    return {name: prompts[:limit] for name, prompts in sets.items()}


def setting_name(config: dict[str, Any]) -> str:
    """A short label: method, draft model if any, k."""
    parts = [config.get("method", "ngram")]
    if "model" in config:
        parts.append(str(config["model"]) + (f" {config['quantization']}" if "quantization" in config else ""))
    parts.append(f"k={config.get('num_speculative_tokens', 4)}")
    return " ".join(parts)


def _counters(peer: NanoinferPeer) -> list[float]:
    """[drafts, draft tokens, accepted tokens] so far; prometheus keeps counters as `<name>_total`."""
    registry = peer.engine.metrics.registry
    names = ("num_drafts", "num_draft_tokens", "num_accepted_tokens")
    return [registry.get_sample_value(f"nanoinfer:spec_decode_{n}_total") or 0.0 for n in names]


def _decode_set(complete: Callable[[list[int]], Completion], prompts: list[list[int]]) -> Sample:
    """Every prompt once, one after another: summed decode figures and the answers."""
    done = [complete(ids) for ids in prompts]
    steps = [c.steps for c in done]
    return {
        "decode_tokens": sum(c.decode_tokens for c in done),
        "decode_s": sum(c.decode_s for c in done),
        "steps": None if None in steps else sum(s or 0 for s in steps),
        "tokens": sum(len(c.token_ids) for c in done),
        "outputs": [c.token_ids for c in done],
    }


def _nano_batch1(
    settings: dict[str, NanoinferPeer], prompts: list[list[int]], n: int, repeats: int
) -> dict[str, list[Sample]]:
    """{setting: a Sample per round}: every prompt once, one at a time, each setting answering in
    lockstep with the others (see run_in_lockstep); decode time counts the steps after the first token."""
    run_in_lockstep(
        {s: ClosedLoop(peer, [Request(prompts[0], 8)], 1, stop_at_eos=True) for s, peer in settings.items()}
    )
    runs: dict[str, list[Sample]] = {s: [] for s in settings}
    requests = [Request(ids, n) for ids in prompts]
    for r in range(repeats):
        before = {s: _counters(peer) for s, peer in settings.items()}
        loops = _fresh_loops(settings, requests, 1, r, stop_at_eos=True)
        run_in_lockstep(loops)
        for s, loop in loops.items():
            outputs = [loop.token_ids[i] for i in range(len(prompts))]
            sample: Sample = {
                "decode_tokens": sum(len(ids) - 1 for ids in outputs),
                "decode_s": sum(t.finish - t.first_token for t in loop.timings()),
                "steps": sum(loop.token_steps[i] - 1 for i in range(len(prompts))),
                "tokens": sum(len(ids) for ids in outputs),
                "outputs": outputs,
            }
            after = _counters(settings[s])
            sample["drafts"], sample["draft_tokens"], sample["accepted_tokens"] = (
                b - a for a, b in zip(before[s], after)
            )
            runs[s].append(sample)
    return runs


def _summary(runs: list[Sample], reference: list[list[int]]) -> dict[str, Any]:
    """Median decode tok/s of the runs, their forwards and drafts pooled, and whether every run's
    answers equal `reference`."""
    tok_s = [r["decode_tokens"] / r["decode_s"] if r["decode_s"] > 0 else 0.0 for r in runs]
    out: dict[str, Any] = {
        "tok_s": statistics.median(tok_s),
        "generated_tokens": runs[0]["tokens"],
        "identical": all(r["outputs"] == reference for r in runs),
        "samples_tok_s": tok_s,
        "tokens_per_forward": None,
        "acceptance": None,
    }
    if all(r["steps"] for r in runs):
        out["tokens_per_forward"] = sum(r["decode_tokens"] for r in runs) / sum(r["steps"] for r in runs)
    if "draft_tokens" in runs[0]:
        drafted, accepted = sum(r["draft_tokens"] for r in runs), sum(r["accepted_tokens"] for r in runs)
        out.update(draft_tokens=drafted, accepted_tokens=accepted, acceptance=accepted / drafted if drafted else None)
    return out


def paired_ratio(samples: list[float], baseline: list[float]) -> float | None:
    """The median of the per-round ratios, each round's run against the baseline's run of the
    same round. The machine's speed drifts 10-20% between rounds a minute apart, which moves a
    ratio of medians by as much; within a round the settings share the drift."""
    ratios = [a / b for a, b in zip(samples, baseline) if b > 0]
    return statistics.median(ratios) if ratios else None


def _peer_samplers(
    peers: dict[str, Any], args: argparse.Namespace, eos: list[int], log: Log
) -> dict[str, dict[str, Callable[[list[list[int]], int], Sample]]]:
    """{engine: {setting: sampler(prompts, n)}} for the peers that have prompt lookup."""
    k = args.spec_lookup_tokens
    lookup = f"prompt lookup k={k}"
    out: dict[str, dict[str, Callable[[list[list[int]], int], Sample]]] = {}
    hf = peers.get("transformers")
    if isinstance(hf, TransformersPeer):

        def hf_sample(pl: int | None, prompts: list[list[int]], n: int) -> Sample:
            return _decode_set(partial(hf.complete, n=n, eos=eos, prompt_lookup=pl), prompts)

        out["transformers"] = {BASELINE: partial(hf_sample, None), lookup: partial(hf_sample, k)}
    cpp = peers.get("llama.cpp")
    if isinstance(cpp, LlamaCppPeer):
        try:
            cpp_lookup = LlamaCppPeer(cpp.gguf_path, cpp.threads, prompt_lookup=k)
        except ImportError as e:  # an older llama-cpp-python without llama_speculative
            log(f"llama.cpp prompt lookup skipped: {e}")
        else:

            def cpp_sample(peer: LlamaCppPeer, prompts: list[list[int]], n: int) -> Sample:
                return _decode_set(partial(peer.complete, n=n, eos=eos), prompts)

            out["llama.cpp"] = {BASELINE: partial(cpp_sample, cpp), lookup: partial(cpp_sample, cpp_lookup)}
    return out


def run_spec(peers: dict[str, Any], args: argparse.Namespace, log: Log) -> dict[str, dict[str, Any]]:
    """{engine: spec results}: batch1[setting][workload] and serving[c][setting][workload]."""
    nano = peers["nanoinfer"]
    configs: dict[str, dict[str, Any] | None] = {BASELINE: None}
    for config in json.loads(args.spec_configs):
        name = setting_name(config)
        configs[name if name not in configs else f"{name} #{len(configs)}"] = config
    log(f"spec: loading nanoinfer for {', '.join(configs)}")
    settings = {
        name: NanoinferPeer(
            nano.model,
            dtype=nano.dtype,
            quantization=nano.kwargs.get("quantization"),
            kv_cache_dtype=nano.kwargs.get("kv_cache_dtype", "auto"),
            max_num_seqs=max(args.spec_concurrency, 1),
            max_model_len=MAX_MODEL_LEN,
            speculative_config=config,
        )
        for name, config in configs.items()
    }
    base = settings[BASELINE]
    eos = sorted(base.engine.eos_ids)
    workloads = {
        name: [base.llm.chat_prompt([{"role": "user", "content": p}]) for p in prompts]
        for name, prompts in load_workloads(args.spec_workloads, args.spec_prompts).items()
    }
    others = _peer_samplers(peers, args, eos, log)
    nano_spec = {"info": base.describe(), "configs": configs, "batch1": {}, "serving": {}}
    results: dict[str, dict[str, Any]] = {"nanoinfer": nano_spec}
    results.update({engine: {"batch1": {}} for engine in others})
    n = args.spec_max_tokens
    answer_lens: dict[str, list[int]] = {}
    for workload, prompts in workloads.items():
        samplers: dict[tuple[str, str], Callable[[], Sample]] = {}
        warmups: dict[tuple[str, str], Callable[[], Sample]] = {}
        for e, fs in others.items():
            for s, f in fs.items():
                samplers[e, s], warmups[e, s] = partial(f, prompts, n), partial(f, prompts[:1], 8)
        runs = _interleaved(samplers, args.repeats, warmups)
        runs.update(
            {("nanoinfer", s): samples for s, samples in _nano_batch1(settings, prompts, n, args.repeats).items()}
        )
        for engine in results:
            reference = runs[engine, BASELINE][0]["outputs"]
            rows = {s: _summary(samples, reference) for (e, s), samples in runs.items() if e == engine}
            for s, row in rows.items():
                row["ratio"] = paired_ratio(row["samples_tok_s"], rows[BASELINE]["samples_tok_s"])
                results[engine]["batch1"].setdefault(s, {})[workload] = row
                acc = "" if row["acceptance"] is None else f", acceptance {row['acceptance']:.2f}"
                tpf = "" if row["tokens_per_forward"] is None else f", {row['tokens_per_forward']:.2f} tok/forward"
                log(
                    f"{engine}: spec {s} {workload} {row['tok_s']:.1f} tok/s ({row['ratio'] or 0:.2f}x){acc}{tpf}"
                    + ("" if row["identical"] else ", OUTPUTS DIFFER")
                )
        answer_lens[workload] = [len(ids) for ids in runs["nanoinfer", BASELINE][0]["outputs"]]
    if args.spec_concurrency > 0:
        results["nanoinfer"]["serving"] = _serving(settings, workloads, answer_lens, args, log)
    return results


def _serving(
    settings: dict[str, NanoinferPeer],
    workloads: dict[str, list[list[int]]],
    answer_lens: dict[str, list[int]],
    args: argparse.Namespace,
    log: Log,
) -> dict[str, Any]:
    """serving[c][setting][workload]: output tok/s with the baseline's greedy answer lengths, so every
    setting generates the same tokens (EOS ignored at exactly that length). Each round serves the
    request set on every setting at once, in lockstep (`lockstep_tok_s`)."""
    c = args.spec_concurrency
    out: dict[str, Any] = {}
    for workload, prompts in workloads.items():
        lens = answer_lens[workload]
        requests = [Request(prompts[i % len(prompts)], lens[i % len(prompts)]) for i in range(args.spec_requests)]
        lockstep_tok_s(settings, [Request(prompts[0], 4)] * 2, c)  # warm-up
        rounds = [lockstep_tok_s(settings, requests, c, r) for r in range(args.repeats)]
        tok_s = {s: [r[s] for r in rounds] for s in settings}
        for s in settings:
            ratio = paired_ratio(tok_s[s], tok_s[BASELINE])
            row = {"output_tok_s": statistics.median(tok_s[s]), "ratio": ratio, "samples_tok_s": tok_s[s]}
            out.setdefault(str(c), {}).setdefault(s, {})[workload] = row
            log(f"nanoinfer: spec serving c={c} {s} {workload} {row['output_tok_s']:.1f} out tok/s ({ratio or 0:.2f}x)")
    return out


def lockstep_tok_s(
    settings: dict[str, NanoinferPeer], requests: list[Request], concurrency: int, round_index: int = 0
) -> dict[str, float]:
    """{setting: output tok/s}: every setting serves `requests` with `concurrency` closed-loop
    clients, in lockstep with the others (see run_in_lockstep)."""
    loops = _fresh_loops(settings, requests, concurrency, round_index)
    run_in_lockstep(loops)
    tokens = sum(r.output_len for r in requests)
    return {s: tokens / loop.busy_s for s, loop in loops.items()}


def _fresh_loops(
    settings: dict[str, NanoinferPeer],
    requests: list[Request],
    concurrency: int,
    round_index: int,
    stop_at_eos: bool = False,
) -> dict[str, ClosedLoop]:
    """A ClosedLoop per setting over an emptied prefix cache, in round_order (the order they step in)."""
    loops = {}
    for s in round_order(list(settings), round_index):
        settings[s].reset_cache()
        loops[s] = ClosedLoop(settings[s], requests, concurrency, stop_at_eos)
    return loops


def run_in_lockstep(loops: dict[str, ClosedLoop]) -> None:
    """Run the loops to the end, one engine step each in turn; each loop's clock counts only its own
    steps. The machine's speed drifts by 10% between runs seconds apart: taking turns step by
    step, every setting meets the same drift, so their ratios no longer carry it."""
    while any(not loop.done for loop in loops.values()):
        for loop in loops.values():
            if not loop.done:
                loop.step()
