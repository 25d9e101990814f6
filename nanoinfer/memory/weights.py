"""Weight bytes by storage format, as the engine builds them (engine/model_setup.py, quant/)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from nanoinfer.config import EngineConfig, ModelConfig
from nanoinfer.kernels import Q4_COLS, Q4_GROUP, Q4_RECORD, Q8_COLS, Q8_GROUP, Q8_RECORD, kernels
from nanoinfer.quant import DEFAULT_GROUP_SIZE, HEAD_GROUP_SIZE, METHODS, PROJECTIONS
from nanoinfer.quant.int4 import choose_int4_backend

# ---- settings -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    """The dtypes and kernels a model would run with: what decides each tensor's bytes."""

    quantization: str
    weights: torch.dtype  # float weights (EngineConfig.dtype)
    activations: torch.dtype
    kv: torch.dtype
    device: str
    c_kernels: bool  # our C kernels load here (CPU only)
    dense_above_rows: int | None

    @property
    def act_bytes(self) -> int:
        return element_size(self.activations)

    @property
    def weight_bytes(self) -> int:
        return element_size(self.weights)


def resolve_runtime(engine: EngineConfig, default_quantization: str) -> Runtime:
    """The engine's choices for these settings (engine/model_setup.py), without building a model."""
    from nanoinfer.engine.model_setup import activation_dtype, kv_cache_dtype, weight_dtype

    try:
        device = torch.device(engine.device)
    except RuntimeError:
        raise ValueError(f"unknown device {engine.device!r}") from None
    quantization = engine.quantization or default_quantization
    if quantization not in METHODS:
        raise ValueError(f"unknown quantization method {quantization!r}; expected one of {', '.join(METHODS)}")
    weights = weight_dtype(engine.dtype)
    activations = activation_dtype(weights, device)
    kv = kv_cache_dtype(engine.kv_cache_dtype, activations, device, engine.dtype)
    ours = device.type == "cpu" and kernels() is not None
    return Runtime(quantization, weights, activations, kv, str(device), ours, engine.dense_above_rows)


def element_size(dtype: torch.dtype) -> int:
    return dtype.itemsize


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- weights --------------------------------------------------------------------------------------


@dataclass
class WeightFormat:
    """Weights stored one way (e.g. int4 in our kernel's panels): values and bytes of each kind of
    tensor stored so (embedding, norms, projections, ...)."""

    parts: dict[str, list[int]] = field(default_factory=dict)  # what -> [values, bytes]

    @property
    def params(self) -> int:
        return sum(p[0] for p in self.parts.values())

    @property
    def bytes(self) -> int:
        return sum(p[1] for p in self.parts.values())

    def add(self, params: int, nbytes: int, what: str) -> None:
        part = self.parts.setdefault(what, [0, 0])
        part[0] += params
        part[1] += nbytes

    def to_json(self) -> dict[str, Any]:
        parts = {what: {"params": p, "bytes": b} for what, (p, b) in self.parts.items()}
        return {"params": self.params, "bytes": self.bytes, "holds": parts}


Weights = dict[str, WeightFormat]  # format label -> what is stored that way


def _add(weights: Weights, label: str, params: int, nbytes: int, what: str) -> None:
    weights.setdefault(label, WeightFormat()).add(params, nbytes, what)


@dataclass(frozen=True)
class _Linear:
    """One Linear module of the built model (q/k/v and gate/up fused as the model fuses them)."""

    path: str
    out_features: int
    in_features: int
    bias: bool


def _module_path(name: str, config: ModelConfig) -> str:
    """The module holding canonical weight `name` in the Transformer (q/k/v -> qkv_proj, gate/up -> gate_up_proj)."""
    path = name.rpartition(".")[0]
    head, _, last = path.rpartition(".")
    if last in ("gate_proj", "up_proj"):
        return f"{head}.gate_up_proj"
    if not config.is_mla and last in ("q_proj", "k_proj", "v_proj"):  # MLA's q_proj stands alone
        return f"{head}.qkv_proj"
    return path


def _rank_tensors(shapes: dict[str, tuple[int, ...]], config: ModelConfig) -> tuple[list[_Linear], dict[str, int]]:
    """A rank's Linear modules, and its other tensors (embedding, norms, routers) by name -> values."""
    linears: dict[str, list[int]] = {}  # path -> [out_features, in_features, has bias]
    others: dict[str, int] = {}
    for name, shape in shapes.items():
        path = _module_path(name, config)
        last = path.rpartition(".")[2]
        if name == "embed.weight" or last.endswith("norm") or last == "router":
            others[name] = math.prod(shape)
            continue
        entry = linears.setdefault(path, [0, 0, 0])
        if name.endswith(".bias"):
            entry[2] = 1
        else:
            entry[0] += shape[0]
            entry[1] = shape[1]
    return [_Linear(p, o, i, bool(b)) for p, (o, i, b) in linears.items()], others


def _int4_bytes(out_features: int, in_features: int, rt: Runtime) -> tuple[str, int, bool]:
    """(format label, bytes, runs on our kernel) of Int4Linear in groups of DEFAULT_GROUP_SIZE."""
    group = DEFAULT_GROUP_SIZE
    backend = choose_int4_backend(out_features, in_features, group, torch.device(rt.device))
    if backend == "c":  # per block of Q4_COLS columns and group: the nibbles, a float32 scale and min each
        blocks = -(-out_features // Q4_COLS)
        return (
            f"int4, groups of {group} (C kernel panels, float32 scale + min)",
            blocks * (in_features // Q4_GROUP) * Q4_RECORD,
            True,
        )
    groups = -(-in_features // group)
    nibbles = out_features * (in_features // 2 if backend == "torch" else -(-in_features // 2))
    scales = groups * out_features * 2 * rt.act_bytes  # scales_and_zeros [G, N, 2]
    layout = "torch int4pack" if backend == "torch" else "packed nibbles"
    return f"int4, groups of {group} ({layout}, {dtype_name(rt.activations)} scale + zero)", nibbles + scales, False


def _int8_bytes(out_features: int, in_features: int, group: int | None, rt: Runtime) -> tuple[str, int, bool]:
    """(format label, bytes, runs on our kernel) of Int8Linear (per channel, or in groups)."""
    scales = out_features * (in_features // group if group else 1) * rt.act_bytes
    grouping = f"groups of {group}" if group else "per channel"
    if rt.c_kernels and in_features % Q8_GROUP == 0:  # our panels: 8 columns x 32 k of int8, 8 float32 scales
        panels = -(-out_features // Q8_COLS) * (in_features // Q8_GROUP) * Q8_RECORD
        return f"int8, {grouping} (C kernel panels)", panels + scales, True
    return f"int8, {grouping}", out_features * in_features + scales, False


def _quantized_linear(weights: Weights, lin: _Linear, method: str, group: int | None, rt: Runtime, what: str) -> None:
    """A linear as quantize_model leaves it: the quantized module, its bias, and the float copy
    for large batches where our kernels do not run it (quant._maybe_dense)."""
    n, k = lin.out_features, lin.in_features
    if method == "int4":
        label, nbytes, ours = _int4_bytes(n, k, rt)
    else:
        label, nbytes, ours = _int8_bytes(n, k, group, rt)
    _add(weights, label, n * k, nbytes, what)
    if lin.bias:  # kept in the compute dtype
        _add(weights, dtype_name(rt.activations), n, n * rt.act_bytes, "biases")
    if rt.dense_above_rows is not None and not ours:
        label = f"{dtype_name(rt.weights)} copies for batches over {rt.dense_above_rows} rows"
        _add(weights, label, n * k, n * k * rt.weight_bytes, what)


def _float_linear(weights: Weights, lin: _Linear, dtype: torch.dtype, rt: Runtime, what: str) -> None:
    """An unquantized linear: its weight in `dtype`; the bias float32 in a 16-bit HalfLinear,
    else in the compute dtype."""
    n, k = lin.out_features, lin.in_features
    _add(weights, dtype_name(dtype), n * k, n * k * element_size(dtype), what)
    if lin.bias:
        half = dtype != rt.activations
        bias_dtype = torch.float32 if half else rt.activations
        _add(weights, dtype_name(bias_dtype), n, n * element_size(bias_dtype), "biases")


def _what(path: str) -> str:
    """The kind of tensor a linear is, as the plan lists it."""
    last = path.rpartition(".")[2]
    if ".experts." in path:
        return "routed experts"
    if ".shared_experts." in path:
        return "shared experts"
    if last in ("qkv_proj", "o_proj"):
        return "attention projections"
    if last in ("gate_up_proj", "down_proj"):
        return "dense MLPs"
    if last in PROJECTIONS:
        return "MLA query and latent projections"
    return "MLA kv_b (float: absorbed into queries and outputs)"


def weight_formats(
    shapes: dict[str, tuple[int, ...]], config: ModelConfig, rt: Runtime, tied_head_rows: int | None
) -> Weights:
    """Bytes of a rank's weights by storage format. `shapes` are the canonical weights the rank
    holds; `tied_head_rows`: the rows of a tied LM head this rank computes (None: no tied head)."""
    weights: Weights = {}
    linears, others = _rank_tensors(shapes, config)
    quantized = rt.quantization != "none"
    for name, values in others.items():
        if name == "embed.weight":  # store_weights_16bit narrows it to the weight dtype
            _add(weights, dtype_name(rt.weights), values, values * rt.weight_bytes, "embedding")
        elif name.endswith("norm.weight"):  # norms stay float32 (Gemma's 1 + w needs the precision)
            _add(weights, "float32", values, values * 4, "norms")
        else:  # routers: bare parameters in the compute dtype, which quantization leaves alone
            _add(weights, dtype_name(rt.activations), values, values * rt.act_bytes, "routers")
    for lin in linears:
        if lin.path == "lm_head":
            head = "LM head"
            if quantized:  # always int8 in groups of 32 (quant.HEAD_GROUP_SIZE) where they fit
                group = HEAD_GROUP_SIZE if lin.in_features % HEAD_GROUP_SIZE == 0 else None
                _quantized_linear(weights, lin, "int8", group, rt, head)
            else:
                _float_linear(weights, lin, rt.weights, rt, head)
        elif lin.path.rpartition(".")[2] in PROJECTIONS and quantized:
            # int4 in groups of DEFAULT_GROUP_SIZE, int8 per output channel (quant._quantize_linear)
            group = DEFAULT_GROUP_SIZE if rt.quantization == "int4" else None
            _quantized_linear(weights, lin, rt.quantization, group, rt, _what(lin.path))
        elif lin.path.rpartition(".")[2] in PROJECTIONS:  # 16-bit weights become a HalfLinear
            _float_linear(weights, lin, rt.weights, rt, _what(lin.path))
        else:  # MLA's kv_b_proj is neither quantized nor narrowed: the compute dtype
            _float_linear(weights, lin, rt.activations, rt, _what(lin.path))
    if tied_head_rows is not None and quantized:  # an int8 copy of the embedding; unquantized, it is the head
        lin = _Linear("lm_head", tied_head_rows, config.hidden_size, False)
        group = HEAD_GROUP_SIZE if config.hidden_size % HEAD_GROUP_SIZE == 0 else None
        _quantized_linear(weights, lin, "int8", group, rt, "tied LM head (an int8 copy of the embedding)")
    return weights
