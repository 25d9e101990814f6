"""Training data: plain text, chat messages or prompt/completion pairs, turned into token ids and
labels (-100 where no loss is taken), and batched with right padding.

Every problem (an unreadable file, a bad JSON line, an example longer than the context, an empty
set) is found before training starts and reported with its line number.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nanoinfer.errors import NanoInferError
from nanoinfer.tokenizer import Tokenizer

IGNORE = -100  # label of a position that takes no loss (the prompt, padding), as torch's cross_entropy


class DataError(NanoInferError):
    """Training data that cannot be used; the message names the file and line."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # the next-token target is labels[t + 1]; IGNORE where no loss


def load_examples(path: str | Path, tokenizer: Tokenizer, block_size: int, max_len: int) -> list[Example]:
    """Examples of a .txt file (lines joined and cut into blocks) or a .jsonl file (one per line)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if block_size < 2 or block_size > max_len:
        raise DataError(f"--block-size must be between 2 and the context length {max_len}, got {block_size}")
    if path.suffix == ".jsonl":
        examples = [_json_example(path, n, line, tokenizer, max_len) for n, line in _lines(text)]
    else:
        examples = _text_blocks(text, tokenizer, block_size)
    if not examples:
        raise DataError(f"{path} holds no training examples")
    return examples


def _lines(text: str) -> Iterator[tuple[int, str]]:
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            yield n, line


def _text_blocks(text: str, tokenizer: Tokenizer, block_size: int) -> list[Example]:
    """Every line, encoded as a prompt would be (BOS first where the model wants one) and ended by
    EOS, joined into one stream and cut into block_size pieces (the seed's way)."""
    eos = tokenizer.eos_token_ids[:1]
    stream: list[int] = []
    for _, line in _lines(text):
        stream += tokenizer.encode(line.strip()) + list(eos)
    blocks = [stream[i : i + block_size] for i in range(0, len(stream), block_size)]
    return [Example(b, list(b)) for b in blocks if len(b) >= 2]


def _json_example(path: Path, n: int, line: str, tokenizer: Tokenizer, max_len: int) -> Example:
    where = f"{path}:{n}"
    try:
        record = json.loads(line)
    except ValueError as e:
        raise DataError(f"{where}: not valid JSON: {e}") from None
    if isinstance(record, dict) and "messages" in record:
        example = _chat_example(where, record["messages"], tokenizer)
    elif (
        isinstance(record, dict) and isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str)
    ):
        example = _completion_example(record["prompt"], record["completion"], tokenizer)
    else:
        raise DataError(f'{where}: expected {{"messages": [...]}} or {{"prompt": "...", "completion": "..."}}')
    if len(example.input_ids) > max_len:
        raise DataError(f"{where}: the example has {len(example.input_ids)} tokens, over the context of {max_len}")
    if all(label == IGNORE for label in example.labels[1:]):
        raise DataError(f"{where}: nothing to learn (no assistant or completion tokens)")
    return example


def _completion_example(prompt: str, completion: str, tokenizer: Tokenizer) -> Example:
    """Loss on the completion (and the EOS after it) only."""
    head = tokenizer.encode(prompt)
    tail = tokenizer.encode(completion, add_special_tokens=False) + list(tokenizer.eos_token_ids[:1])
    return Example(head + tail, [IGNORE] * len(head) + tail)


def _chat_example(where: str, messages: Any, tokenizer: Tokenizer) -> Example:
    """The conversation rendered by the chat template; loss on the assistant turns only.

    Each assistant turn's tokens are found by rendering the conversation up to it (with the
    generation prompt) and through it: the difference is what the model must learn to write.
    """
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise DataError(f"{where}: messages must be a non-empty list of objects")
    if tokenizer.chat_template is None:
        raise DataError(f"{where}: this model has no chat template to render messages with")
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=True)
        labels = [IGNORE] * len(ids)
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=True)
            through = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False, tokenize=True)
            if ids[: len(through)] != through or through[: len(before)] != before:
                raise DataError(f"{where}: the chat template does not render this conversation turn by turn")
            labels[len(before) : len(through)] = through[len(before) :]
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    return Example(ids, labels)


def batches(
    examples: list[Example], batch_size: int, seed: int, epoch: int, pad_id: int
) -> list[dict[str, torch.Tensor]]:
    """One epoch's batches, shuffled by (seed, epoch): input_ids and labels [B, T], right-padded."""
    order = list(range(len(examples)))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return [collate([examples[i] for i in order[s : s + batch_size]], pad_id) for s in range(0, len(order), batch_size)]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[row, : len(e.labels)] = torch.tensor(e.labels)
    return {"input_ids": ids, "labels": labels}
