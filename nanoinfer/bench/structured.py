"""The `structured` scenario: what JSON-schema-constrained decoding costs.

    python -m nanoinfer.bench.compare --scenarios structured --engines nanoinfer

- serving at --structured-concurrency: the same chat prompts (extract fields from a paragraph)
  with and without a JSON schema, greedy, output tok/s; the two interleaved in rounds.
- time to first token at batch 1: unconstrained vs a schema never seen before (a fresh property
  name each time, so no cached grammar helps).
- per-token mask time: a constrained answer replayed through a fresh matcher, timing each mask.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial
from typing import Any

from nanoinfer.bench.compare import Log, _interleaved
from nanoinfer.bench.peers import NanoinferPeer

PARAGRAPHS = [
    "Maria Lopez, 34, is a civil engineer in Valencia who builds bridges and cycles to work.",
    "Tom Becker is a 58-year-old baker from Hamburg; he opens his shop at five every morning.",
    "Aiko Tanaka, aged 27, teaches mathematics in Osaka and plays the violin in an orchestra.",
    "Samuel Okafor, a 41-year-old pilot from Lagos, has flown cargo planes for fifteen years.",
]
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 40},
        "job": {"type": "string", "maxLength": 40},
    },
    "required": ["name", "age", "city", "job"],
    "additionalProperties": False,
}


def _params(schema: dict[str, Any] | None, max_tokens: int, ignore_eos: bool = False) -> Any:
    from nanoinfer import SamplingParams, StructuredOutputsParams

    spec = None if schema is None else StructuredOutputsParams(json=schema)
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=ignore_eos, structured_outputs=spec)


def _serve(
    peer: NanoinferPeer,
    prompts: list[list[int]],
    lengths: list[int],
    schema: dict[str, Any] | None,
    args: argparse.Namespace,
) -> float:
    """Output tok/s of a closed loop of --structured-concurrency clients over the prompts. Without
    a schema each answer is as long as the constrained one (EOS ignored), so both runs decode the
    same number of tokens after the same prompts."""
    engine = peer.engine
    engine.prefix_cache.reset()
    pending = list(range(len(prompts)))
    live: set[str] = set()
    tokens = 0
    start = time.perf_counter()
    while pending or live:
        while pending and len(live) < args.structured_concurrency:
            i = pending.pop()
            rid = f"structured-{i}-{time.perf_counter_ns()}"
            params = _params(schema, lengths[i], ignore_eos=schema is None)
            engine.add_request(rid, prompts[i], params)
            live.add(rid)
        for out in engine.step():
            if out.finished:
                live.discard(out.request_id)
                tokens += len(out.outputs[0].token_ids)
    return tokens / (time.perf_counter() - start)


def _ttft(peer: NanoinferPeer, prompt: list[int], schema: dict[str, Any] | None) -> float:
    peer.engine.prefix_cache.reset()
    start = time.perf_counter()
    for _ in peer.llm.stream(prompt, _params(schema, 2)):
        return time.perf_counter() - start
    raise RuntimeError("the engine returned no output")


def _fresh_schema(i: int) -> dict[str, Any]:
    """The scenario's schema with a property name no earlier request used: no cached grammar."""
    props = dict(SCHEMA["properties"], **{f"note_{i}_{time.perf_counter_ns()}": {"type": "boolean"}})
    return {**SCHEMA, "properties": props, "required": list(props)}


def _mask_times(peer: NanoinferPeer, prompt: list[int], args: argparse.Namespace) -> list[float]:
    """Seconds per mask along one constrained greedy answer, replayed through a fresh matcher."""
    from nanoinfer import StructuredOutputsParams

    answer = peer.llm.generate([prompt], _params(SCHEMA, args.structured_max_tokens))[0].outputs[0].token_ids
    state = peer.engine.structured.state(StructuredOutputsParams(json=SCHEMA))
    times = []
    for token in answer:
        start = time.perf_counter()
        state.allowed()
        times.append(time.perf_counter() - start)
        state.accept(token)
    return times


def run_structured(peer: NanoinferPeer, args: argparse.Namespace, log: Log) -> dict[str, Any]:
    """The scenario's figures for nanoinfer."""
    chat = [
        peer.llm.chat_prompt([{"role": "user", "content": f"Extract name, age, city and job as JSON: {p}"}])
        for p in PARAGRAPHS
    ]
    prompts = [chat[i % len(chat)] for i in range(args.structured_requests)]
    answers = peer.llm.generate(chat, _params(SCHEMA, args.structured_max_tokens))
    lengths = [len(answers[i % len(chat)].outputs[0].token_ids) for i in range(len(prompts))]
    serve = partial(_serve, peer, prompts, lengths, args=args)
    samplers = {"free": partial(serve, schema=None), "json_schema": partial(serve, schema=SCHEMA)}
    serving = _interleaved(samplers, args.repeats)
    tok_s = {k: statistics.median(v) for k, v in serving.items()}
    counter = iter(range(10**6))
    ttft = _interleaved(
        {
            "free": partial(_ttft, peer, chat[0], None),
            "new_schema": lambda: _ttft(peer, chat[0], _fresh_schema(next(counter))),
        },
        max(args.repeats, 5),
    )
    ttft_ms = {k: 1000 * statistics.median(v) for k, v in ttft.items()}
    masks = sorted(_mask_times(peer, chat[0], args))
    out = {
        "concurrency": args.structured_concurrency,
        "output_tok_s": tok_s,
        "ratio": tok_s["json_schema"] / tok_s["free"],
        "ttft_ms": ttft_ms,
        "ttft_extra_ms": ttft_ms["new_schema"] - ttft_ms["free"],
        "mask_ms_p50": 1000 * masks[len(masks) // 2],
        "mask_ms_p90": 1000 * masks[int(0.9 * (len(masks) - 1))],
        "samples": {"serving": serving, "ttft": ttft},
    }
    log(
        f"nanoinfer: structured c={args.structured_concurrency} {tok_s['free']:.1f} -> {tok_s['json_schema']:.1f} "
        f"out tok/s ({out['ratio']:.2f}x); TTFT {ttft_ms['free']:.0f} ms, new schema {ttft_ms['new_schema']:.0f} ms; "
        f"mask p50 {out['mask_ms_p50']:.2f} ms, p90 {out['mask_ms_p90']:.2f} ms"
    )
    return out


def structured_markdown(result: dict[str, Any]) -> list[str]:
    """The scenario's table."""
    tok, ttft = result["output_tok_s"], result["ttft_ms"]
    return [
        "## Structured outputs",
        "",
        f"Greedy chat answers, JSON schema vs unconstrained; serving at concurrency {result['concurrency']}.",
        "",
        "| figure | unconstrained | JSON schema | ratio or difference |",
        "|---|---:|---:|---:|",
        f"| serving output tok/s | {tok['free']:.1f} | {tok['json_schema']:.1f} | {result['ratio']:.2f}× |",
        f"| TTFT, batch 1 (ms; a never-seen schema) | {ttft['free']:.0f} | {ttft['new_schema']:.0f} | "
        f"+{result['ttft_extra_ms']:.0f} ms |",
        f"| mask per token (ms), p50 / p90 | – | {result['mask_ms_p50']:.2f} / {result['mask_ms_p90']:.2f} | |",
    ]
