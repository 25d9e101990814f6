"""Weight-only quantization: swap a model's nn.Linear projections for int8 / int4 modules in place."""

from __future__ import annotations

from torch import nn

from nanoinfer.quant.int4 import Int4Linear, dequantize_int4, quantize_int4
from nanoinfer.quant.int8 import Int8Linear, dequantize_int8, quantize_int8

METHODS = ("none", "int8", "int4")
DEFAULT_GROUP_SIZE = 32
# The projections of every decoder layer; embeddings and norms stay in float.
_LAYER_LINEARS = ("attn.qkv_proj", "attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")

__all__ = [
    "METHODS",
    "Int4Linear",
    "Int8Linear",
    "dequantize_int4",
    "dequantize_int8",
    "quantize_int4",
    "quantize_int8",
    "quantize_model",
    "weight_bytes",
]


def _quantize_linear(linear: nn.Linear, method: str, group_size: int) -> nn.Module:
    """The quantized replacement of one nn.Linear."""
    if method == "int8":
        return Int8Linear.from_linear(linear)
    return Int4Linear.from_linear(linear, group_size)


def quantize_model(
    model: nn.Module, method: str, group_size: int = DEFAULT_GROUP_SIZE, quantize_head: bool = False
) -> nn.Module:
    """Replace each layer's qkv/o/gate_up/down nn.Linear (and optionally an untied lm_head) in place.

    `quantize_head` stays off by default: Transformer.compute_logits multiplies by
    `lm_head.weight` directly, which a quantized module does not have. A tied head (lm_head is
    None) is never touched: the embedding table doubles as the head and stays in float.
    """
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; expected one of {', '.join(METHODS)}")
    if method == "none":
        return model
    targets = [f"layers.{i}.{name}" for i in range(len(model.layers)) for name in _LAYER_LINEARS]
    if quantize_head and getattr(model, "lm_head", None) is not None:
        targets.append("lm_head")
    for path in targets:
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        linear = getattr(parent, attr)
        if isinstance(linear, nn.Linear):  # already-quantized modules are left as they are
            setattr(parent, attr, _quantize_linear(linear, method, group_size))
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by weights: every parameter plus the buffers of quantized modules (not RoPE tables)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, (Int8Linear, Int4Linear)):
            total += sum(b.numel() * b.element_size() for b in module.buffers(recurse=False))
    return total
