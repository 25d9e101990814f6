"""Weight-only quantization: swap a model's nn.Linear projections for int8 / int4 modules in place."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from nanoinfer.quant.half import HalfLinear
from nanoinfer.quant.int4 import Int4Linear, dequantize_int4, quantize_int4
from nanoinfer.quant.int8 import Int8Linear, dequantize_int8, quantize_int8

if TYPE_CHECKING:
    from nanoinfer.model.transformer import Transformer

METHODS = ("none", "int8", "int4")
DEFAULT_GROUP_SIZE = 32
# The quantized head is int8 in groups of 32: GGUF embeddings are often Q8_0 (the same format),
# which then round-trips exactly; per-channel int8 cost agreement (docs/performance.md,
# "Quantization quality").
HEAD_GROUP_SIZE = 32
# The projections of every decoder layer, a MoE layer's experts and MLA's query and latent
# projections included; embeddings, norms and routers stay in float, and so does MLA's kv_b_proj,
# whose weight the absorbed attention folds into the queries and outputs.
PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "q_proj", "q_a_proj", "q_b_proj", "kv_a_proj")


def _projection_paths(model: Transformer) -> list[str]:
    """Module paths of every decoder-layer projection (e.g. layers.3.mlp.experts.7.down_proj)."""
    return [
        name
        for name, _ in model.named_modules()
        if name.startswith("layers.") and name.rsplit(".", 1)[-1] in PROJECTIONS
    ]


__all__ = [
    "METHODS",
    "HalfLinear",
    "Int4Linear",
    "Int8Linear",
    "dequantize_int4",
    "dequantize_int8",
    "quantize_int4",
    "quantize_int8",
    "quantize_model",
    "store_weights_16bit",
    "weight_bytes",
]


def _quantize_linear(linear: nn.Linear, method: str, group_size: int) -> Int8Linear | Int4Linear:
    """The quantized replacement of one nn.Linear (int8: per output channel, whatever group_size)."""
    if method == "int8":
        return Int8Linear.from_linear(linear)
    return Int4Linear.from_linear(linear, group_size)


def quantize_model(
    model: Transformer,
    method: str,
    group_size: int = DEFAULT_GROUP_SIZE,
    quantize_head: bool = True,
    dense_above_rows: int | None = None,
) -> Transformer:
    """Replace each layer's qkv/o/gate_up/down nn.Linear, and the LM head, in place.

    The head is always group-wise int8 (a 49k x 576 head in int4 costs noticeably more quality
    than it saves time); a tied head becomes an int8 copy of the embedding, which stays in float
    for lookups.
    `dense_above_rows`: batches with more rows than this run a float copy of the dequantized
    weight, because on CPUs without native bf16 matmul torch's int8 kernel loses to fp32 GEMM at
    large batch (docs/performance.md, "int8 matmul"). Costs the float weights' memory. Layers
    on our C kernels need no copy: their integer dot products beat fp32 GEMM at every batch size
    (`python -m nanoinfer.bench.kernels`).
    """
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; expected one of {', '.join(METHODS)}")
    if method == "none":
        return model
    for path in _projection_paths(model):
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        linear = getattr(parent, attr)
        if isinstance(linear, nn.Linear):  # already-quantized modules are left as they are
            quantized = _quantize_linear(linear, method, group_size)
            setattr(parent, attr, _maybe_dense(quantized, linear, group_size, dense_above_rows))
    if quantize_head and model.embed is not None:  # (a later pipeline stage has no head)
        head = model.lm_head
        if head is None:  # tied: the embedding table is the head
            head = nn.Linear(model.embed.weight.shape[1], model.embed.weight.shape[0], bias=False)
            head.weight = model.embed.weight
        if isinstance(head, nn.Linear):
            group = HEAD_GROUP_SIZE if head.in_features % HEAD_GROUP_SIZE == 0 else None
            quantized = Int8Linear.from_linear(head, group)
            model.lm_head = _maybe_dense(quantized, head, group, dense_above_rows)
    return model


def store_weights_16bit(model: Transformer, dtype: torch.dtype) -> Transformer:
    """Keep the float weights that quantization left (projections, head, embedding, the float
    copies for large batches) in `dtype`.

    Activations stay in the model's float32; see nanoinfer/quant/half.py for why. Norm weights
    stay float32 (they are tiny, and Gemma's 1 + w offsets need the precision).
    """
    for path in _projection_paths(model):
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        module = getattr(parent, attr)
        if isinstance(module, nn.Linear):
            setattr(parent, attr, HalfLinear.from_linear(module, dtype))
        elif isinstance(module, DenseForLargeBatch):  # its float copy is widened per call
            module.to_16bit(dtype)
    if model.embed is None:  # a later pipeline stage: no embedding, no head
        return model
    model.embed.weight.data = model.embed.weight.data.to(dtype)
    if model.lm_head is None:  # tied: one 16-bit table serves the lookup and the head
        model.lm_head = HalfLinear(model.embed.weight.data, None)
    elif isinstance(model.lm_head, nn.Linear):
        model.lm_head = HalfLinear.from_linear(model.lm_head, dtype)
    elif isinstance(model.lm_head, DenseForLargeBatch):
        model.lm_head.to_16bit(dtype)
    return model


class DenseForLargeBatch(nn.Module):
    """A quantized linear for small batches (decode), a dequantized float copy (`dense`, [N, K],
    run by F.linear) for large ones."""

    dense: torch.Tensor  # a buffer

    def __init__(self, quantized: Int8Linear | Int4Linear, dense_weight: torch.Tensor, dense_above_rows: int):
        super().__init__()
        self.quantized = quantized
        self.dense_above_rows = dense_above_rows
        self.out_features = dense_weight.shape[0]
        self.register_buffer("dense", dense_weight, persistent=False)
        self.bias = quantized.bias

    def to_16bit(self, dtype: torch.dtype) -> None:
        """Keep the float copy in a 16-bit dtype (widened per call; see store_weights_16bit)."""
        self.dense = self.dense.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= self.dense_above_rows * x.shape[-1]:  # up to the threshold's rows
            return self.quantized.forward(x)  # skips a second Module.__call__ on the per-token path
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dense.to(x.dtype), bias)


def _on_our_kernels(quantized: Int8Linear | Int4Linear) -> bool:
    """Whether a quantized layer runs our C kernels, which need no float copy at any batch size."""
    if isinstance(quantized, Int4Linear):
        return quantized.backend == "c"
    return isinstance(quantized, Int8Linear) and quantized.panels is not None


def _maybe_dense(
    quantized: Int8Linear | Int4Linear, linear: nn.Linear, group_size: int | None, dense_above_rows: int | None
) -> nn.Module:
    if dense_above_rows is None or _on_our_kernels(quantized):
        return quantized
    # The same quantized values, dequantized by the reference formula (cheap, unlike reading
    # packed kernel weights back), so both paths multiply by identical weights.
    w = linear.weight.detach()
    if isinstance(quantized, Int8Linear):
        dense = dequantize_int8(*quantize_int8(w, None if quantized.scales.dim() == 1 else group_size))
    else:
        dense = dequantize_int4(*quantize_int4(w, quantized.group_size), quantized.group_size)
    return DenseForLargeBatch(quantized, dense.to(w.dtype), dense_above_rows)


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by weights: every parameter plus the buffers of quantized modules (not RoPE tables).

    A tensor shared by two modules (a tied 16-bit head and the embedding) counts once.
    """
    tensors: list[torch.Tensor] = list(model.parameters())
    for module in model.modules():
        if isinstance(module, (Int8Linear, Int4Linear, DenseForLargeBatch, HalfLinear)):
            tensors += [b for b in module.buffers(recurse=False) if b is not None]
    unique = {t.data_ptr(): t.numel() * t.element_size() for t in tensors}
    return sum(unique.values())
