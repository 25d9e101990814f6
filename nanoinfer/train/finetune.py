"""Fine-tuning our own Transformer, fully or with LoRA: `finetune(FinetuneConfig(...))`, or
`nanoinfer finetune` on the command line.

The model runs its dense training path (`Transformer.forward_dense`: torch ops with autograd,
no KV cache). Weights stay float32 (the master copy); `dtype="bfloat16"` runs the forward pass
under bfloat16 autocast. AdamW with linear warm-up then cosine decay, gradient accumulation,
clipping, an evaluation loss after every epoch, checkpoints to resume from, and in the output
directory: the adapter (PEFT format) or the whole model (HF format), `train_log.json` and
`loss_curve.png`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nanoinfer.adapters.peft_files import save_adapter
from nanoinfer.errors import NanoInferError
from nanoinfer.loading import load_package
from nanoinfer.model.lora import LoRASpec, apply_lora
from nanoinfer.model.transformer import Transformer
from nanoinfer.train.data import IGNORE, Example, batches, collate, load_examples
from nanoinfer.train.export import save_hf_model, trainable_state
from nanoinfer.train.loss import linear_cross_entropy

METHODS = ("lora", "full")
CHECKPOINT_PREFIX = "checkpoint-"
KEEP_CHECKPOINTS = 2


@dataclass(frozen=True)
class FinetuneConfig:
    """What to train, on what, and how. lr None: 2e-4 for LoRA, 2e-5 for full fine-tuning."""

    model: str
    data: str
    output: str
    eval_data: str | None = None
    method: str = "lora"
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_target: tuple[str, ...] = ("q_proj", "v_proj")
    epochs: int = 1
    lr: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    block_size: int = 128
    max_steps: int | None = None  # optimizer steps; stops early when reached
    warmup_ratio: float = 0.1  # share of the steps spent warming the learning rate up
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    dtype: str = "float32"  # "bfloat16": bf16 autocast over float32 master weights
    seed: int = 0
    resume: bool = False  # continue from the newest checkpoint in `output`
    progress: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        for name in ("epochs", "batch_size", "grad_accum", "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {self.max_steps}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 2e-4 if self.method == "lora" else 2e-5

    def lora_spec(self) -> LoRASpec:
        return LoRASpec(
            r=self.lora_r, alpha=self.lora_alpha, targets=tuple(self.lora_target), dropout=self.lora_dropout
        )


@dataclass
class FinetuneResult:
    output: Path
    steps: int
    train_losses: list[float] = field(default_factory=list)  # per optimizer step
    eval_losses: list[float] = field(default_factory=list)  # before training, then per epoch


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up to `peak` over `warmup` steps, then cosine decay to zero at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return peak * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def token_loss(model: Transformer, batch: dict[str, torch.Tensor], autocast: bool) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over the labelled positions, and how many there were."""
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE).flatten()  # shifted labels, shifted logits
    count = int((targets != IGNORE).sum())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        hidden = model.hidden_dense(batch["input_ids"]).flatten(0, 1)
        head = model.embed if model.lm_head is None else model.lm_head
        if isinstance(head, (nn.Embedding, nn.Linear)):
            softcap = model.config.final_logit_softcapping or 0.0
            return linear_cross_entropy(hidden, head.weight, targets, IGNORE, softcap), count
        logits = model.compute_logits(hidden)  # a head of another kind (quantized): the plain way
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE), count


@torch.no_grad()
def evaluate(model: Transformer, examples: list[Example], batch_size: int, pad_id: int, autocast: bool) -> float:
    """Mean token loss over `examples` (dropout off)."""
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        loss, count = token_loss(model, collate(examples[start : start + batch_size], pad_id), autocast)
        total += float(loss) * count
        tokens += count
    return total / max(tokens, 1)


class Trainer:
    """One fine-tuning run: the model and data loaded and checked, then `train()`."""

    def __init__(self, config: FinetuneConfig) -> None:
        self.config = c = config
        self.output = Path(c.output)
        self.package = load_package(c.model)
        self.tokenizer = self.package.tokenizer
        max_len = self.package.config.max_position_embeddings
        # Data first: a bad file fails before any time goes into building the model.
        self.train_set = load_examples(c.data, self.tokenizer, c.block_size, max_len)
        self.eval_set = load_examples(c.eval_data, self.tokenizer, c.block_size, max_len) if c.eval_data else []
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        torch.manual_seed(c.seed)
        self.model = Transformer.from_package(self.package, torch.float32)
        self.package.weights = {}  # the model holds them now
        self.wrapped = {}
        if c.method == "lora":
            self.model.requires_grad_(False)
            self.wrapped = apply_lora(self.model, self.model.config, c.lora_spec())
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=c.learning_rate, weight_decay=c.weight_decay)
        self.steps_per_epoch = math.ceil(math.ceil(len(self.train_set) / c.batch_size) / c.grad_accum)
        self.total_steps = min(self.steps_per_epoch * c.epochs, c.max_steps or self.steps_per_epoch * c.epochs)
        self.warmup = int(self.total_steps * c.warmup_ratio)
        self.step = 0
        self.epoch = 0
        self.log: list[dict[str, Any]] = []

    # -- the loop ----------------------------------------------------------------------------

    def train(self) -> FinetuneResult:
        c = self.config
        self.output.mkdir(parents=True, exist_ok=True)
        if c.resume:
            self._resume()
        autocast = c.dtype == "bfloat16"
        if self.eval_set and self.step == 0:
            self._record(
                kind="eval", epoch=0, loss=evaluate(self.model, self.eval_set, c.batch_size, self.pad_id, autocast)
            )
        bar = _progress(self.total_steps, self.step, c.progress)
        while self.epoch < c.epochs and self.step < self.total_steps:
            self._train_epoch(autocast, bar)
            self.epoch += 1
            if self.eval_set:
                loss = evaluate(self.model, self.eval_set, c.batch_size, self.pad_id, autocast)
                self._record(kind="eval", epoch=self.epoch, loss=loss)
            self._checkpoint()
        if bar is not None:
            bar.close()
        self._save_result()
        return FinetuneResult(
            self.output,
            self.step,
            train_losses=[e["loss"] for e in self.log if e["kind"] == "train"],
            eval_losses=[e["loss"] for e in self.log if e["kind"] == "eval"],
        )

    def _train_epoch(self, autocast: bool, bar: Any) -> None:
        c = self.config
        micro = batches(self.train_set, c.batch_size, c.seed, self.epoch, self.pad_id)
        done_in_epoch = self.step - self._steps_before_epoch()
        micro = micro[done_in_epoch * c.grad_accum :]  # resuming mid-epoch skips what was trained
        self.model.train()
        for start in range(0, len(micro), c.grad_accum):
            if self.step >= self.total_steps:
                return
            loss_value, speed = self.train_step(micro[start : start + c.grad_accum], autocast)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{speed:.0f}")

    def train_step(self, group: list[dict[str, torch.Tensor]], autocast: bool = False) -> tuple[float, float]:
        """One optimizer step over `group`'s micro-batches (accumulated); its loss and tokens/s."""
        c = self.config
        began = time.perf_counter()
        losses, tokens = [], 0
        for batch in group:
            loss, _ = token_loss(self.model, batch, autocast)
            (loss / len(group)).backward()
            losses.append(float(loss.detach()))
            tokens += int(batch["input_ids"].numel())
        lr = lr_at(self.step, self.total_steps, self.warmup, c.learning_rate)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        norm = torch.nn.utils.clip_grad_norm_(self.params, c.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        speed = tokens / (time.perf_counter() - began)
        loss_value = sum(losses) / len(losses)
        self._record(
            kind="train",
            step=self.step,
            epoch=self.epoch,
            loss=loss_value,
            lr=lr,
            grad_norm=float(norm),
            tokens_per_s=speed,
        )
        return loss_value, speed

    def _steps_before_epoch(self) -> int:
        return min(self.epoch * self.steps_per_epoch, self.total_steps)

    def _record(self, **entry: Any) -> None:
        self.log.append(entry)

    # -- checkpoints -------------------------------------------------------------------------

    def _checkpoint(self) -> None:
        """Trainable weights, optimizer, position and random state: enough to resume exactly."""
        directory = self.output / f"{CHECKPOINT_PREFIX}{self.step}"
        directory.mkdir(parents=True, exist_ok=True)
        state = {
            "trainable": trainable_state(self.model),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "log": self.log,
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            "config": dataclasses.asdict(self.config),
        }
        torch.save(state, directory / "trainer_state.pt")
        old = sorted(self._checkpoints(), key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))
        for stale in old[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(stale, ignore_errors=True)

    def _checkpoints(self) -> list[Path]:
        return [p for p in self.output.glob(f"{CHECKPOINT_PREFIX}*") if p.name[len(CHECKPOINT_PREFIX) :].isdigit()]

    def _resume(self) -> None:
        found = sorted(self._checkpoints(), key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))
        if not found:
            raise NanoInferError(f"--resume: no {CHECKPOINT_PREFIX}N directory in {self.output}")
        state = torch.load(found[-1] / "trainer_state.pt", weights_only=False)
        params = dict(self.model.named_parameters())
        for name, tensor in state["trainable"].items():
            params[name].data.copy_(tensor)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.epoch, self.log = state["step"], state["epoch"], state["log"]
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])

    # -- results -----------------------------------------------------------------------------

    def _save_result(self) -> None:
        c = self.config
        if c.method == "lora":
            save_adapter(self.wrapped, c.lora_spec(), self.output, c.model)
        else:
            save_hf_model(self.model, self.package, self.output)
        (self.output / "train_log.json").write_text(
            json.dumps({"config": dataclasses.asdict(c), "log": self.log}, indent=1)
        )
        _plot(self.log, self.output / "loss_curve.png")


def _progress(total: int, done: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc="finetune", unit="step")


def _plot(log: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in log if e["kind"] == "train"]
    steps_per_epoch = {e["epoch"]: e["step"] for e in log if e["kind"] == "train"}
    evals = [
        (steps_per_epoch.get(e["epoch"] - 1, 0) if e["epoch"] else 0, e["loss"]) for e in log if e["kind"] == "eval"
    ]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss (end of epoch)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("token cross-entropy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
