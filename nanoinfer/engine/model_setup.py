"""Turning a loaded package into a runnable model: weight, activation and KV cache dtypes,
quantization. Shared by the engine's target model and a speculative draft model."""

from __future__ import annotations

import torch

from nanoinfer.kernels import kernels
from nanoinfer.loading import ModelPackage
from nanoinfer.model.parallel import PipelineStage, TensorParallel
from nanoinfer.model.transformer import Transformer
from nanoinfer.quant import quantize_model, store_weights_16bit

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def weight_dtype(name: str) -> torch.dtype:
    """The float weights' dtype for EngineConfig.dtype `name` ("auto": float32)."""
    if name == "auto":
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def activation_dtype(weight_dtype: torch.dtype, device: str | torch.device) -> torch.dtype:
    """float32 on CPU whatever the weights' dtype (no 16-bit arithmetic there; see quant/half.py)."""
    return torch.float32 if torch.device(device).type == "cpu" else weight_dtype


def kv_cache_dtype(
    name: str, activations: torch.dtype, device: str | torch.device, model_dtype: str = "auto"
) -> torch.dtype:
    """The KV cache's dtype for EngineConfig.kv_cache_dtype `name`.

    "auto" is float16 where our C attention reads the cache (float32 activations on a CPU with the
    kernels built), because decode attention over many sequences streams the whole cache every
    step and half the bytes make it much faster (docs/performance.md, "KV cache dtype"). A user
    who asked for dtype float32 asked for float32 numerics, so then the cache is float32 too.
    Elsewhere it is the activations' dtype, as in vLLM."""
    if name == "auto":
        ours = torch.device(device).type == "cpu" and activations == torch.float32 and kernels() is not None
        return torch.float16 if ours and model_dtype != "float32" else activations
    if name not in DTYPES:
        raise ValueError(f"unknown kv_cache_dtype {name!r}; expected auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def build_model(
    package: ModelPackage,
    dtype: str,
    quantization: str,
    device: str,
    dense_above_rows: int | None = None,
    tp: TensorParallel | None = None,
    stage: PipelineStage | None = None,
) -> Transformer:
    """The package's Transformer (a tensor-parallel rank's shard with `tp`, a pipeline stage's
    layers with `stage`) with weights in `dtype` (EngineConfig.dtype) and quantized to
    `quantization` ("none", "int8", "int4")."""
    weights = weight_dtype(dtype)
    activations = activation_dtype(weights, device)
    model = Transformer.from_package(package, activations, device, tp, stage)
    quantize_model(model, quantization, dense_above_rows=dense_above_rows)
    if weights != activations:
        store_weights_16bit(model, weights)
    return model
