"""Load a transformers-style model directory (config.json + safetensors + tokenizer) into a ModelPackage."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open

from nanoinfer.config import GenerationDefaults, ModelConfig
from nanoinfer.errors import ModelLoadError
from nanoinfer.loading.package import WeightFilter, expected_shapes, fused_parts

if TYPE_CHECKING:
    from nanoinfer.loading.package import ModelPackage

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Prefixes in front of the text model's names: plain causal LMs ("model."), gemma3 multimodal
# checkpoints in transformers 5 ("model.language_model.") and 4 ("language_model.model.").
_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.", "model.")

# Per-layer HF suffix -> canonical suffix; post_attention_layernorm is special-cased (see _layer_name).
_LAYER_SUFFIXES = {
    "input_layernorm.weight": "input_norm.weight",
    "pre_feedforward_layernorm.weight": "pre_mlp_norm.weight",
    "post_feedforward_layernorm.weight": "post_mlp_norm.weight",
    **{f"self_attn.{p}_proj.{k}": f"attn.{p}_proj.{k}" for p in "qkvo" for k in ("weight", "bias")},
    "self_attn.q_norm.weight": "attn.q_norm.weight",
    # DeepSeek's multi-head latent attention (model/mla.py)
    "self_attn.q_a_proj.weight": "attn.q_a_proj.weight",
    "self_attn.q_a_layernorm.weight": "attn.q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn.q_b_proj.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn.kv_a_proj.weight",
    "self_attn.kv_a_layernorm.weight": "attn.kv_a_norm.weight",
    "self_attn.kv_b_proj.weight": "attn.kv_b_proj.weight",
    "mlp.gate.e_score_correction_bias": "mlp.router.correction_bias",
    **{f"mlp.shared_experts.{p}_proj.weight": f"mlp.shared_experts.{p}_proj.weight" for p in ("gate", "up", "down")},
    "self_attn.k_norm.weight": "attn.k_norm.weight",
    **{f"mlp.{p}_proj.weight": f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")},
}
# Canonical suffix -> HF suffix, for messages; both post_attention_layernorm readings included.
_HF_SUFFIXES = {canon: hf for hf, canon in _LAYER_SUFFIXES.items()} | {
    "post_attn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_LEVEL = {"embed_tokens.weight": "embed.weight", "norm.weight": "norm.weight", "lm_head.weight": "lm_head.weight"}
_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)")
FusedRows = tuple[int, int, int]  # (first row, end row, rows of the whole fused tensor)
# Experts: qwen3_moe's mlp.experts.N.gate_proj; mixtral's block_sparse_moe.experts.N.w1 (gate), w3 (up), w2 (down).
_EXPERT_RE = re.compile(r"(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight")
_MIXTRAL_EXPERT = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def load_hf_dir(
    path: str | Path, dtype: torch.dtype | str | None = None, weight_filter: WeightFilter | None = None
) -> ModelPackage:
    """Read config, weights, tokenizer and generation defaults of a transformers model directory."""
    root = Path(path)
    if not root.is_dir():
        raise ModelLoadError(f"{root} is not a directory")
    hf_config = _read_json(root / "config.json", required=True)
    config = ModelConfig.from_hf(hf_config)
    weights = load_hf_weights(root, config, _torch_dtype(dtype), weight_filter)
    tokenizer = _load_tokenizer(root)
    generation = _generation_defaults(root, hf_config, tokenizer)
    from nanoinfer.loading.package import ModelPackage

    return ModelPackage(
        config=config,
        weights=weights,
        tokenizer=tokenizer,
        generation=generation,
        source=str(root),
        file_type=config.torch_dtype,  # the dtype the checkpoint was saved in
        weight_filter=weight_filter,
    )


def load_hf_weights(
    root: Path, config: ModelConfig, dtype: torch.dtype | None = None, weight_filter: WeightFilter | None = None
) -> dict[str, torch.Tensor]:
    """Canonical name -> tensor for every weight the config needs, shape-checked, read one tensor at a time."""
    expected = expected_shapes(config)
    found = _locate_tensors(root, config)  # canonical -> (file, hf name, rows of a fused tensor)
    for name in expected:
        if name not in found:
            raise ModelLoadError(f"weights in {root} lack tensor {hf_name(name, config)!r} (canonical {name!r})")
    weights: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(found[name][0], []).append(name)
    for file, names in by_file.items():
        with _open(file) as f:
            for name in names:
                _, hf, rows = found[name]
                tensor = _read_tensor(f, file, hf, expected[name], dtype, rows)
                kept = tensor if weight_filter is None else weight_filter(name, tensor, config)
                if kept is not None:
                    weights[name] = kept
    return weights


def canonical_name(hf_name: str, config: ModelConfig) -> str | None:
    """Map one HF tensor name to its canonical name; None for tensors nanoinfer does not use."""
    name = hf_name
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    match = _LAYER_RE.fullmatch(name)
    if not match:
        return None  # vision tower, projector, rotary buffers of old checkpoints
    suffix = _layer_suffix(match.group(2), config)
    return f"layers.{match.group(1)}.{suffix}" if suffix else None


def _layer_suffix(hf_suffix: str, config: ModelConfig) -> str | None:
    """Canonical per-layer suffix; gemma3's post_attention_layernorm normalizes the attention output."""
    if hf_suffix == "post_attention_layernorm.weight":
        return "post_attn_norm.weight" if config.post_norms else "pre_mlp_norm.weight"
    expert = _EXPERT_RE.fullmatch(hf_suffix)
    if expert:
        return f"mlp.experts.{expert.group(1)}.{_MIXTRAL_EXPERT.get(expert.group(2), expert.group(2))}.weight"
    if hf_suffix in ("mlp.gate.weight", "block_sparse_moe.gate.weight") and config.num_experts:
        return "mlp.router.weight"
    return _LAYER_SUFFIXES.get(hf_suffix)


def hf_name(canonical: str, config: ModelConfig) -> str:
    """The usual HF name of a canonical weight, for error messages."""
    if canonical == "lm_head.weight":
        return canonical
    top = {canon: hf for hf, canon in _TOP_LEVEL.items()}
    if canonical in top:
        return "model." + top[canonical]
    _, layer, suffix = canonical.split(".", 2)
    if suffix == "pre_mlp_norm.weight" and not config.post_norms:
        suffix = "post_attention_layernorm.weight"  # llama-likes name their pre-MLP norm this way
    if config.architecture == "mixtral" and suffix.startswith("mlp."):
        suffix = "block_sparse_moe." + suffix[len("mlp.") :]
        for ours, theirs in {v: k for k, v in _MIXTRAL_EXPERT.items()}.items():
            suffix = suffix.replace(f".{ours}.", f".{theirs}.")
    suffix = suffix.replace(".router.", ".gate.")
    return f"model.layers.{layer}.{_HF_SUFFIXES.get(suffix, suffix)}"


def _locate_tensors(root: Path, config: ModelConfig) -> dict[str, tuple[Path, str, FusedRows | None]]:
    """Canonical name -> (safetensors file, HF name, rows of a fused tensor or None), from the
    shard index or the single file."""
    index_path = root / INDEX_FILE
    if index_path.is_file():
        weight_map = _read_json(index_path, required=True).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index_path} has no 'weight_map'")
        files = {hf: root / shard for hf, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise ModelLoadError(f"{index_path} names shard {shard.name}, which is missing")
    elif (root / SINGLE_FILE).is_file():
        single = root / SINGLE_FILE
        with _open(single) as f:
            files = {hf: single for hf in f.keys()}  # noqa: SIM118 -- a safe_open handle is not iterable
    else:
        other = " (PyTorch .bin checkpoints are not supported)" if any(root.glob("*.bin")) else ""
        raise ModelLoadError(f"no {SINGLE_FILE} or {INDEX_FILE} in {root}{other}")
    located: dict[str, tuple[Path, str, FusedRows | None]] = {}
    for hf, file in files.items():
        for part, rows in _fused_parts(hf, config):
            located[part] = (file, hf, rows)
        canon = canonical_name(hf, config)
        if canon is not None:
            located[canon] = (file, hf, None)
    return located


def _fused_parts(hf_name: str, config: ModelConfig) -> list[tuple[str, FusedRows]]:
    """Phi-3's qkv_proj and gate_up_proj: each part's canonical name, its rows, and the fused
    tensor's row count; [] for other tensors."""
    match = _LAYER_RE.fullmatch(hf_name.removeprefix("model."))
    fused = {"self_attn.qkv_proj.weight": "qkv", "mlp.gate_up_proj.weight": "gate_up"}
    if not match or match.group(2) not in fused:
        return []
    parts = fused_parts(config, match.group(1), fused[match.group(2)])
    total = max(end for _, end in parts.values())
    return [(name, (start, end, total)) for name, (start, end) in parts.items()]


def _open(file: Path) -> Any:
    """safe_open with safetensors' errors (truncated header, bad JSON) turned into ModelLoadError."""
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {file}: {_one_line(e)}") from e


def _read_tensor(
    f: Any, file: Path, hf_name: str, shape: tuple[int, ...], dtype: torch.dtype | None, rows: FusedRows | None = None
) -> torch.Tensor:
    """One tensor (or `rows` of a fused one), shape-checked before its data is read, cast to dtype if given."""
    try:
        found = tuple(f.get_slice(hf_name).get_shape())
        want = shape if rows is None else (rows[2], *shape[1:])
        if found != want:
            raise ModelLoadError(
                f"tensor {hf_name!r} in {file.name} has shape {list(found)}, config expects {list(want)}"
            )
        tensor = f.get_tensor(hf_name) if rows is None else f.get_slice(hf_name)[rows[0] : rows[1]]
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"cannot read tensor {hf_name!r} from {file}: {_one_line(e)}") from e
    if dtype is not None and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    return tensor


def _torch_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """Accept torch dtypes or their names ('bfloat16', 'float16', 'float32'; 'auto' keeps the file's)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ModelLoadError(f"unsupported dtype {dtype!r}; use float32, bfloat16 or float16")
    return resolved


def _load_tokenizer(root: Path) -> Any:
    """The directory's tokenizer through nanoinfer's own Tokenizer class."""
    from nanoinfer.tokenizer import Tokenizer  # late: keeps weight loading usable on its own

    try:
        return Tokenizer.from_hf_dir(root)
    except ModelLoadError:
        raise
    except Exception as e:  # the tokenizers library raises bare exceptions on malformed files
        raise ModelLoadError(f"cannot load tokenizer from {root}: {_one_line(e)}") from e


def _generation_defaults(root: Path, hf_config: dict[str, Any], tokenizer: Any) -> GenerationDefaults:
    """generation_config.json, with eos/bos falling back to config.json, then to the tokenizer."""
    defaults = GenerationDefaults.from_hf(_read_json(root / "generation_config.json", required=False))
    text_config = hf_config.get("text_config") or {}
    changes: dict[str, Any] = {}
    if not defaults.eos_token_ids:
        eos = hf_config.get("eos_token_id", text_config.get("eos_token_id"))
        from_config = GenerationDefaults.from_hf({"eos_token_id": eos}).eos_token_ids
        changes["eos_token_ids"] = from_config or tuple(getattr(tokenizer, "eos_token_ids", ()))
    if defaults.bos_token_id is None:
        changes["bos_token_id"] = hf_config.get("bos_token_id", text_config.get("bos_token_id"))
    return dataclasses.replace(defaults, **changes)


def _read_json(path: Path, required: bool) -> dict[str, Any]:
    """Parse a JSON object file; a missing optional file reads as {}."""
    if not path.is_file():
        if required:
            raise ModelLoadError(f"no {path.name} in {path.parent}")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot parse {path}: {_one_line(e)}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} does not hold a JSON object")
    return data


def _one_line(error: BaseException) -> str:
    """Error text squeezed onto one line, since ModelLoadError messages are one line."""
    return " ".join(str(error).split()) or type(error).__name__
