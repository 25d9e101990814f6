"""Shared fixtures. Tiny transformers oracle models are built once per session and cached on disk."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tiny_models import build_hf_model, build_tokenizer, save_case

from nanoinfer.loading import registry
from nanoinfer.loading.gguf import load_gguf_tokenizer
from nanoinfer.tokenizer import Tokenizer

TinyModelGetter = Callable[[str], tuple[Path, torch.nn.Module]]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The small trained BPE tokenizer (a transformers PreTrainedTokenizerFast) every tiny model ships with."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # keep "Writing model shards" bars out of test output
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> TinyModelGetter:
    """Function case_id -> (model directory, transformers model); each case is built on first use only."""
    cache: dict[str, tuple[Path, torch.nn.Module]] = {}

    def get(case_id: str) -> tuple[Path, torch.nn.Module]:
        if case_id not in cache:
            model = build_hf_model(case_id)
            directory = save_case(model, tiny_tokenizer, tmp_path_factory.mktemp(f"tiny_{case_id}"))
            cache[case_id] = (directory, model)
        return cache[case_id]

    return get


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    """The built-in SmolLM2 GGUF file."""
    return registry.smollm2_path()


@pytest.fixture(scope="session")
def smollm(smollm_path: Path) -> Tokenizer:
    """Our tokenizer of SmolLM2, from its GGUF metadata."""
    return load_gguf_tokenizer(smollm_path)


@pytest.fixture(scope="session")
def hf_smollm(smollm_path: Path):
    """transformers' tokenizer of the same file: the oracle."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name)
