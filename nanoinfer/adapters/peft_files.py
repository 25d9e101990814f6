"""LoRA adapters in PEFT's file format: `adapter_config.json` + `adapter_model.safetensors`.

Tensors are named as PEFT saves them for a causal LM
(`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`, A [r, in], B [out, r]),
so `peft.PeftModel.from_pretrained` loads what we write and we load what PEFT trains.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from nanoinfer.config import ModelConfig
from nanoinfer.errors import ModelLoadError
from nanoinfer.model.lora import TARGETS, LoRALinear, LoRASpec

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_BLOCK = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


def _peft_key(layer: int, target: str, which: str) -> str:
    block = _BLOCK.get(target, "mlp")
    return f"base_model.model.model.layers.{layer}.{block}.{target}.lora_{which}.weight"


def save_adapter(wrapped: dict[str, LoRALinear], spec: LoRASpec, directory: str | Path, base_model: str) -> None:
    """Write the adapters of `apply_lora`'s modules (keyed "layers.{i}.<module path>") as PEFT does."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for path, module in wrapped.items():
        layer = int(path.split(".")[1])
        for target in module.rows:
            tensors[_peft_key(layer, target, "A")] = module.lora_A[target].detach().float().contiguous().cpu()
            tensors[_peft_key(layer, target, "B")] = module.lora_B[target].detach().float().contiguous().cpu()
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": spec.r,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": sorted(spec.targets),
        "use_rslora": spec.use_rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def read_adapter(
    directory: str | Path, num_layers: int
) -> tuple[LoRASpec, dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]]:
    """The spec and {(layer, target): (A, B)} of a PEFT LoRA adapter directory; ModelLoadError if
    it is not one we can apply exactly."""
    directory = Path(directory)
    try:
        config: dict[str, Any] = json.loads((directory / CONFIG_FILE).read_text())
        tensors = load_file(str(directory / WEIGHTS_FILE))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{directory} is not a PEFT LoRA adapter: {e}") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise ModelLoadError(f"{directory}: only LoRA adapters are supported, not {config.get('peft_type')}")
    for key, allowed in (("bias", "none"), ("use_dora", False), ("modules_to_save", None), ("fan_in_fan_out", False)):
        if config.get(key, allowed) not in (allowed, []):
            raise ModelLoadError(f"{directory}: adapter_config {key}={config[key]!r} is not supported")
    _check_targets(directory, config.get("target_modules"))
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = _KEY.match(name.replace(".default.", "."))
        if match is None or match.group(3) not in TARGETS:
            raise ModelLoadError(f"{directory}: unexpected adapter tensor {name!r}")
        layer = int(match.group(1))
        if layer >= num_layers:
            raise ModelLoadError(
                f"{directory}: adapter tensor {name!r} is for layer {layer}; the model has {num_layers}"
            )
        pairs.setdefault((layer, match.group(3)), {})[match.group(4)] = tensor.float()
    if not pairs or any(set(p) != {"A", "B"} for p in pairs.values()):
        raise ModelLoadError(f"{directory}: every adapted module needs both lora_A and lora_B")
    ranks = {p["A"].shape[0] for p in pairs.values()}
    if len(ranks) != 1 or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ModelLoadError(f"{directory}: adapters with per-module ranks or alphas are not supported")
    spec = LoRASpec(
        r=ranks.pop(),
        alpha=float(config.get("lora_alpha", 8)),
        targets=tuple(sorted({target for _, target in pairs})),
        use_rslora=bool(config.get("use_rslora", False)),
    )
    return spec, {key: (p["A"], p["B"]) for key, p in pairs.items()}


def _check_targets(directory: Path, targets: Any) -> None:
    """Refuse an adapter naming modules our layers do not have (say lm_head, or GPT-2's c_attn).
    A regex string is left to the tensor names, which are checked one by one."""
    if isinstance(targets, str) or not targets:
        return
    lacking = sorted(set(targets) - set(TARGETS))
    if lacking:
        raise ModelLoadError(
            f"{directory}: the adapter targets {', '.join(lacking)}, which this model lacks; "
            f"LoRA can target {', '.join(TARGETS)}"
        )


def load_into(
    wrapped: dict[str, LoRALinear], weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
) -> None:
    """Copy read_adapter's tensors into the modules of apply_lora (same spec); shapes are checked."""
    for path, module in wrapped.items():
        layer = int(path.split(".")[1])
        for target in module.rows:
            a, b = weights[(layer, target)]
            for name, param, tensor in (("A", module.lora_A[target], a), ("B", module.lora_B[target], b)):
                if tuple(param.shape) != tuple(tensor.shape):
                    raise ModelLoadError(
                        f"adapter {target} lora_{name} of layer {layer} has shape {tuple(tensor.shape)}; "
                        f"the model needs {tuple(param.shape)}"
                    )
                param.data.copy_(tensor)


def merge_adapter(weights: dict[str, torch.Tensor], config: ModelConfig, directory: str | Path) -> None:
    """Fold a PEFT LoRA adapter into canonical float weights in place: W += scaling * B @ A."""
    spec, pairs = read_adapter(directory, config.num_layers)
    for (layer, target), (a, b) in pairs.items():
        block = "attn" if target in _BLOCK else "mlp"
        name = f"layers.{layer}.{block}.{target}.weight"
        w = weights[name]
        if tuple(w.shape) != (b.shape[0], a.shape[1]):
            raise ModelLoadError(f"{directory}: {target} of layer {layer} does not fit the model's {tuple(w.shape)}")
        weights[name] = (w.float() + spec.scaling * (b @ a)).to(w.dtype)
