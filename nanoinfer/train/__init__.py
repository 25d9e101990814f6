"""Fine-tuning, full or LoRA, on nanoinfer's own Transformer: data.py (text, chat messages,
prompt/completion), finetune.py (the Trainer), export.py (HF model directories)."""

from __future__ import annotations

from typing import Any

from nanoinfer.train.data import DataError
from nanoinfer.train.finetune import FinetuneConfig, FinetuneResult, Trainer


def finetune(config: FinetuneConfig | None = None, **kwargs: Any) -> FinetuneResult:
    """Train as `config` (or FinetuneConfig(**kwargs)) says; the result is in config.output."""
    return Trainer(config if config is not None else FinetuneConfig(**kwargs)).train()


__all__ = ["DataError", "FinetuneConfig", "FinetuneResult", "Trainer", "finetune"]
