"""A model's config from metadata alone: a config.json, a GGUF header, a built-in name."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanoinfer.config import ModelConfig
from nanoinfer.errors import ModelLoadError

# registry.load_builtin gives every built-in GGUF model this default quantization.
BUILTIN_QUANTIZATION = "int4"

# ---- metadata -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelMetadata:
    """What the planner knows of a model: its config and the quantization the engine defaults to."""

    config: ModelConfig
    name: str  # as given: a built-in name or a path
    source: str  # the file read: a config.json or a GGUF
    kind: str  # "config.json" or "GGUF header"
    default_quantization: str = "none"


def read_metadata(model: str) -> ModelMetadata:
    """The config of a built-in name, a model directory, a config.json or a .gguf file, read
    from metadata only (a GGUF's header and tensor directory, not its tensor data)."""
    from nanoinfer.loading import registry

    if model in registry.BUILTIN_MODELS:
        path = registry.builtin_path(model)
        return ModelMetadata(_gguf_config(path), model, str(path), "GGUF header", BUILTIN_QUANTIZATION)
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ModelLoadError(f"{path.parent} is not a model directory: it has no config.json")
    elif not path.exists():
        known = ", ".join(registry.BUILTIN_MODELS)
        raise ModelLoadError(f"model {model!r} not found: no such file or directory, and not a built-in name ({known})")
    if path.suffix.lower() == ".gguf":
        return ModelMetadata(_gguf_config(path), model, str(path), "GGUF header")
    if path.suffix.lower() == ".json":
        return ModelMetadata(ModelConfig.from_hf(_read_config_json(path)), model, str(path), "config.json")
    raise ModelLoadError(f"{path} is neither a model directory, a config.json nor a .gguf file")


def _read_config_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} does not hold a JSON object")
    return data


def _gguf_config(path: Path) -> ModelConfig:
    """ModelConfig from a GGUF header; the tensor directory gives shapes, no tensor is decoded."""
    from nanoinfer.loading.gguf import GGUF_ARCHITECTURES, config_from_metadata, open_gguf

    gf = open_gguf(path)
    try:
        arch = gf.metadata.get("general.architecture")
        if arch not in GGUF_ARCHITECTURES:
            raise ModelLoadError(
                f"{path.name}: GGUF architecture {arch!r} is not supported; supported: {', '.join(GGUF_ARCHITECTURES)}"
            )
        # LongRoPE factors (tensor data) change no size, so they are not read.
        return config_from_metadata(gf.metadata, {name: info.shape for name, info in gf.tensors.items()})
    finally:
        gf.close()
