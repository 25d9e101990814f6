"""Model loading: built-in names, HF directories and GGUF files all become one ModelPackage."""

from __future__ import annotations

from pathlib import Path

from nanoinfer.errors import ModelLoadError
from nanoinfer.loading import registry
from nanoinfer.loading.package import ModelPackage, WeightFilter, expected_shapes


def load_package(name_or_path: str | Path, weight_filter: WeightFilter | None = None) -> ModelPackage:
    """Load a built-in model name, a HF model directory or a .gguf file; `weight_filter` says
    what to keep of each weight as it is read (a tensor-parallel rank's shard)."""
    name = str(name_or_path)
    if name in registry.BUILTIN_MODELS:
        return registry.load_builtin(name, weight_filter)
    path = Path(name).expanduser()
    if not path.exists():
        known = ", ".join(registry.BUILTIN_MODELS)
        raise ModelLoadError(f"model {name!r} not found: no such file or directory, and not a built-in name ({known})")
    if path.is_dir():
        _check_hf_dir(path)
        from nanoinfer.loading.hf import load_hf_dir  # lazy: only HF directories need it

        return load_hf_dir(path, weight_filter=weight_filter)
    if path.suffix.lower() == ".gguf":
        from nanoinfer.loading.gguf import load_gguf

        return load_gguf(path, weight_filter)
    raise ModelLoadError(f"{path} is neither a model directory nor a .gguf file")


def _check_hf_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a model directory: it has no config.json")
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin")) or any(path.glob("*.pt"))
    if not has_weights:
        raise ModelLoadError(f"{path} has no weight files (*.safetensors)")


__all__ = ["ModelPackage", "WeightFilter", "expected_shapes", "load_package", "resolve_model_path"]


def resolve_model_path(name_or_path: str | Path) -> Path:
    """The file or directory behind a model argument (built-in names resolve to their GGUF)."""
    name = str(name_or_path)
    return registry.builtin_path(name) if name in registry.BUILTIN_MODELS else Path(name).expanduser()
