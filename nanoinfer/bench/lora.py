"""The `lora` scenario: what LoRA costs to train and to serve.

    python -m nanoinfer.bench.compare --scenarios lora --engines nanoinfer

- training: optimizer steps of `nanoinfer finetune --method lora` (its Trainer, r=8, alpha=16,
  q_proj and v_proj, dropout 0.05, float32) against transformers + peft in a plain loop with the
  same settings, AdamW and clipping, on the same batches of the 杨语 word list (--lora-batch-size
  x 128-token blocks); the two interleaved step by step.
- serving: the serving requests at --lora-concurrency through --lora-adapters distinct adapters
  (random weights, r=8 on q/k/v/o, one per request in turn, all resident) against the same
  requests on the base model alone; the two interleaved in rounds.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from nanoinfer.bench.compare import Log, _interleaved, _range, _serving_sample, make_requests
from nanoinfer.bench.peers import NanoinferPeer, Request

YANGYU = Path(__file__).parent / "data" / "yangyu"
TRAIN_TARGETS = ("q_proj", "v_proj")
SERVE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
RANK = 8
BLOCK = 128


def _write_copies(model_name: str, directory: Path, num_adapters: int) -> tuple[Path, list[Path]]:
    """An HF copy of the model (for transformers + peft) and `num_adapters` random PEFT adapters."""
    from nanoinfer.adapters.peft_files import save_adapter
    from nanoinfer.loading import load_package
    from nanoinfer.model.lora import LoRASpec, apply_lora
    from nanoinfer.model.transformer import Transformer
    from nanoinfer.train.export import save_hf_model

    package = load_package(model_name)
    model = Transformer.from_package(package, torch.float32)
    save_hf_model(model, package, directory / "hf")
    spec = LoRASpec(RANK, 16, SERVE_TARGETS)
    wrapped = apply_lora(model, model.config, spec)
    adapters = []
    for k in range(num_adapters):
        generator = torch.Generator().manual_seed(k)
        for module in wrapped.values():
            for p in (*module.lora_A.values(), *module.lora_B.values()):
                p.data = torch.randn(p.shape, generator=generator) * 0.01
        save_adapter(wrapped, spec, directory / f"adapter{k}", model_name)
        adapters.append(directory / f"adapter{k}")
    return directory / "hf", adapters


def training_speed(model_name: str, hf_dir: Path, scratch: Path, args: argparse.Namespace, log: Log) -> dict[str, Any]:
    """Tokens/s of LoRA optimizer steps, ours and transformers + peft, on the same batches."""
    import peft
    import transformers

    from nanoinfer.train import FinetuneConfig, Trainer
    from nanoinfer.train.data import batches

    config = FinetuneConfig(
        model=model_name,
        data=str(YANGYU / "train.txt"),
        output=str(scratch / "trained"),
        lora_r=RANK,
        lora_alpha=16,
        lora_target=TRAIN_TARGETS,
        batch_size=args.lora_batch_size,
        block_size=BLOCK,
        progress=False,
    )
    trainer = Trainer(config)
    trainer.model.train()
    peft_config = peft.LoraConfig(r=RANK, lora_alpha=16, target_modules=list(TRAIN_TARGETS), lora_dropout=0.05)
    hf = peft.get_peft_model(
        transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32), peft_config
    )
    hf.train()
    params = [p for p in hf.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate)
    data = [
        b
        for b in batches(trainer.train_set, config.batch_size, 0, 0, trainer.pad_id)
        if b["input_ids"].shape[1] == BLOCK
    ]
    data = [b for b in data if b["input_ids"].shape[0] == config.batch_size]
    if not data:
        raise RuntimeError(f"the 杨语 list makes no full batch of {config.batch_size} x {BLOCK} tokens")
    tokens = config.batch_size * BLOCK

    def ours(batch: dict[str, torch.Tensor]) -> float:
        start = time.perf_counter()
        trainer.train_step([batch])
        return time.perf_counter() - start

    def theirs(batch: dict[str, torch.Tensor]) -> float:
        start = time.perf_counter()
        hf(input_ids=batch["input_ids"], labels=batch["labels"]).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    feeds = {"nanoinfer": itertools.cycle(data), "transformers+peft": itertools.cycle(data)}
    samplers = {
        "nanoinfer": lambda: ours(next(feeds["nanoinfer"])),
        "transformers+peft": lambda: theirs(next(feeds["transformers+peft"])),
    }
    samples = _interleaved(samplers, max(args.repeats, 5))
    tok_s = {name: tokens / statistics.median(s) for name, s in samples.items()}
    ratio = tok_s["nanoinfer"] / tok_s["transformers+peft"]
    log(
        f"nanoinfer: LoRA training {tok_s['nanoinfer']:.0f} tok/s, transformers+peft "
        f"{tok_s['transformers+peft']:.0f} tok/s ({ratio:.2f}x)"
    )
    return {"batch": [config.batch_size, BLOCK], "tok_s": tok_s, "ratio": ratio, "samples_s": samples}


def serving_speed(
    base: NanoinferPeer, adapters: list[Path], vocab: list[int], args: argparse.Namespace, log: Log
) -> dict[str, Any]:
    """Output tok/s at --lora-concurrency, every request through one of the adapters, vs the base alone."""
    from nanoinfer import LoRARequest

    loras = [LoRARequest(f"adapter{k}", k + 1, str(path)) for k, path in enumerate(adapters)]
    kwargs = {**base.kwargs, "enable_lora": True, "max_loras": len(loras), "max_lora_rank": RANK}
    served = NanoinferPeer(base.model, dtype=base.dtype, **kwargs)
    plain = make_requests(vocab, args.lora_requests, _range(args.input_len), _range(args.output_len), seed=3)
    through = [Request(r.prompt_ids, r.output_len, loras[i % len(loras)]) for i, r in enumerate(plain)]
    warm = [Request(vocab[:20], 4, lora) for lora in loras]  # loads every adapter
    c = args.lora_concurrency
    runs = _interleaved(
        {"base": partial(_serving_sample, base, plain, c), "adapters": partial(_serving_sample, served, through, c)},
        args.repeats,
        {"base": partial(base.serve, [Request(vocab[:20], 4)], 1), "adapters": partial(served.serve, warm, len(warm))},
    )
    tok_s = {name: statistics.median(r["output_tok_s"] for r in samples) for name, samples in runs.items()}
    ratio = tok_s["adapters"] / tok_s["base"]
    log(
        f"nanoinfer: serving c={c} base {tok_s['base']:.1f} out tok/s, {len(loras)} adapters "
        f"{tok_s['adapters']:.1f} ({ratio:.2f}x)"
    )
    return {"concurrency": c, "adapters": len(loras), "output_tok_s": tok_s, "ratio": ratio, "samples": runs}


def run_lora(nano: NanoinferPeer, args: argparse.Namespace, vocab: list[int], log: Log) -> dict[str, Any]:
    """The scenario's figures."""
    with tempfile.TemporaryDirectory(prefix="nanoinfer-lora-bench-") as tmp:
        scratch = Path(tmp)
        hf_dir, adapters = _write_copies(nano.model, scratch, args.lora_adapters)
        return {
            "training": training_speed(nano.model, hf_dir, scratch, args, log),
            "serving": serving_speed(nano, adapters, vocab, args, log),
        }


def lora_markdown(result: dict[str, Any]) -> list[str]:
    """The scenario's table."""
    train, serve = result["training"], result["serving"]
    b, t = train["batch"]
    return [
        "## LoRA",
        "",
        f"Training: LoRA r={RANK} on {', '.join(TRAIN_TARGETS)}, float32, batches of {b} x {t} tokens of the "
        "杨语 word list, AdamW and clipping, steps of the two interleaved. Serving: output tok/s at "
        f"concurrency {serve['concurrency']}, each request through one of {serve['adapters']} resident adapters "
        f"(r={RANK} on {', '.join(SERVE_TARGETS)}) vs the base model alone.",
        "",
        "| figure | nanoinfer | reference | ratio |",
        "|---|---:|---:|---:|",
        f"| LoRA training tok/s (reference: transformers + peft) | {train['tok_s']['nanoinfer']:.0f} | "
        f"{train['tok_s']['transformers+peft']:.0f} | {train['ratio']:.2f}× |",
        f"| serving output tok/s with {serve['adapters']} adapters (reference: base model) | "
        f"{serve['output_tok_s']['adapters']:.1f} | {serve['output_tok_s']['base']:.1f} | {serve['ratio']:.2f}× |",
    ]
