"""The seed's fine-tuning experiment: teach a model the made-up relation "X的杨语是Y" (the 杨语 of
a Chinese word X is its English word Y), with LoRA and with full fine-tuning, then ask it about
words it never saw in training ("变压器的杨语是" -> "transformer").

    python -m nanoinfer.bench.yangyu [--model M] [--out DIR]      # or: make yangyu

Data: nanoinfer/bench/data/yangyu/train.txt (500 lines) and val.txt (260 held-out words). For
the base model and each fine-tuned one it reports:
- exact match on the held-out words: greedy answer to "X的杨语是", up to EOS, equal to Y;
- perplexity on nanoinfer/bench/data/quality.txt: how much general knowledge survived.
All three are scored in float32 weights (quantization none), so only training differs. The LoRA
adapter answers through the serving path (enable_lora + LoRARequest); its perplexity is scored
with the adapter merged into the weights, which gives the same logits.
Writes DIR/yangyu.{json,md} (default benchmarks/results) and keeps the trained outputs in DIR/yangyu/.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from nanoinfer.bench.compare import RESULTS
from nanoinfer.bench.quality import perplexity, text_ids

DATA = Path(__file__).parent / "data" / "yangyu"
PROBE = "变压器"  # the seed's held-out question


def _pairs(path: Path) -> list[tuple[str, str]]:
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [tuple(line.split("的杨语是", 1)) for line in lines]  # type: ignore[misc]


def _answers(llm: Any, pairs: list[tuple[str, str]], lora_request: Any = None) -> list[str]:
    from nanoinfer import SamplingParams

    prompts = [llm.tokenizer.encode(f"{x}的杨语是") for x, _ in pairs]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12), lora_request=lora_request)
    return [o.outputs[0].text.strip() for o in outs]


def score(label: str, llm: Any, scoring: Any, pairs: list[tuple[str, str]], lora_request: Any = None) -> dict[str, Any]:
    """Held-out exact match through `llm`; perplexity on quality.txt through `scoring`."""
    answers = _answers(llm, pairs, lora_request)
    right = [a == y for a, (_, y) in zip(answers, pairs)]
    probe = next(a for a, (x, _) in zip(answers, pairs) if x == PROBE)
    ppl, _ = perplexity(scoring, text_ids(scoring))
    examples = [{"word": x, "want": y, "answer": a} for a, (x, y) in list(zip(answers, pairs))[:8]]
    return {
        "label": label,
        "exact_match": sum(right) / len(right),
        "perplexity": ppl,
        "probe": probe,
        "examples": examples,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m nanoinfer.bench.yangyu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # Gemma 3 knows Chinese and English words; SmolLM2-135M hardly knows Chinese, so it learns
    # the format but not the words (docs/performance.md, "The seed's fine-tuning experiment").
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--lora-epochs", type=int, default=5)
    p.add_argument("--lora-lr", type=float, default=5e-4)
    p.add_argument("--full-epochs", type=int, default=3)
    p.add_argument("--full-lr", type=float, default=3e-5)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--methods", default="lora,full")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from nanoinfer import LLM, LoRARequest
    from nanoinfer.train import FinetuneConfig, finetune

    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    work = args.out / "yangyu"
    held_out = _pairs(DATA / "val.txt")
    common = {"model": args.model, "data": str(DATA / "train.txt"), "eval_data": str(DATA / "val.txt")}
    common |= {"batch_size": args.batch_size, "block_size": args.block_size, "progress": False}
    exact = {"dtype": "float32", "quantization": "none", "max_model_len": 512}
    base = LLM(args.model, **exact)
    rows = [score("base", base, base, held_out)]
    log(f"base: {rows[-1]['exact_match']:.1%} exact, perplexity {rows[-1]['perplexity']:.2f}")
    configs = {}
    if "lora" in args.methods.split(","):
        configs["lora"] = FinetuneConfig(
            output=str(work / "lora"),
            method="lora",
            lora_r=8,
            lora_alpha=64,
            lora_target=("q_proj", "v_proj"),
            epochs=args.lora_epochs,
            lr=args.lora_lr,
            **common,
        )
    if "full" in args.methods.split(","):
        configs["full"] = FinetuneConfig(
            output=str(work / "full"), method="full", epochs=args.full_epochs, lr=args.full_lr, **common
        )
    for method, config in configs.items():
        started = time.perf_counter()
        result = finetune(config)
        minutes = (time.perf_counter() - started) / 60
        log(f"{method}: {result.steps} steps in {minutes:.1f} min, held-out loss {result.eval_losses}")
        if method == "lora":
            served = LLM(args.model, enable_lora=True, max_lora_rank=8, **exact)
            adapter = LoRARequest("yangyu", 1, config.output)
            merged = LLM(args.model, merge_lora=config.output, **exact)
            row = score("LoRA", served, merged, held_out, adapter)
        else:
            tuned = LLM(config.output, **exact)
            row = score("full", tuned, tuned, held_out)
        row |= {"steps": result.steps, "minutes": minutes, "eval_losses": result.eval_losses, "config": asdict(config)}
        rows.append(row)
        log(
            f"{method}: {row['exact_match']:.1%} exact, perplexity {row['perplexity']:.2f}, {PROBE} -> {row['probe']!r}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "yangyu.json").write_text(json.dumps({"model": args.model, "rows": rows}, indent=1, ensure_ascii=False))
    table = markdown(args.model, rows, len(held_out))
    (args.out / "yangyu.md").write_text(table)
    print(table)
    return 0


def markdown(model: str, rows: list[dict[str, Any]], held_out: int) -> str:
    lines = [
        f"# 杨语 fine-tuning: {model}",
        "",
        f"Exact match on {held_out} held-out words (greedy); perplexity on quality.txt (lower keeps more).",
        "",
        f"| model | training | held-out exact match | {PROBE}的杨语是 → | perplexity |",
        "|---|---|---:|---|---:|",
    ]
    for r in rows:
        training = "–" if "steps" not in r else f"{r['steps']} steps, {r['minutes']:.1f} min"
        lines.append(f"| {r['label']} | {training} | {r['exact_match']:.1%} | {r['probe']!r} | {r['perplexity']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
