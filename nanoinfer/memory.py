"""The memory planner: what serving a model takes, per rank, worked out from its metadata alone.

`nanoinfer memory` and the engine's KV pool both come from here. A plan reads a config.json or a
GGUF header (never the weights) and adds up, for every tensor-parallel x pipeline rank:

- weights, by storage format, mirroring what the engine builds (engine/model_setup.py and
  nanoinfer.quant.quantize_model): which linears are quantized and how their kernels pack them,
  what stays float (norms, the embedding, routers, MLA's latent projections), the int8 copy of a
  tied LM head, the float copies kept for large batches where our kernels do not run;
- the KV cache: the seeds' formula per token (2 x layers x KV heads x head dim x bytes; MLA: layers
  x (kv_lora_rank + qk_rope_head_dim) x bytes) times the pool the engine allocates (`kv_pool_bytes`,
  whole blocks);
- an estimate of peak activation memory for one step (see `activation_terms`), which nothing else
  in the engine uses.

A rank's share comes from model/parallel.py: `plan_shard`/`shard_config`/`shard_shapes` for tensor
parallelism, `stage_layers` for pipeline stages. Ranks are numbered stage x TP size + TP rank.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nanoinfer.config import EngineConfig, ModelConfig
from nanoinfer.errors import ModelLoadError
from nanoinfer.kernels import KV_DTYPES, Q4_COLS, Q4_GROUP, Q8_COLS, Q8_GROUP, kernels
from nanoinfer.loading.package import expected_shapes
from nanoinfer.model.kv_cache import kv_bytes_per_token
from nanoinfer.model.parallel import PipelineStage, ShardPlan, plan_shard, shard_config, shard_shapes, stage_layers
from nanoinfer.quant import DEFAULT_GROUP_SIZE, HEAD_GROUP_SIZE, METHODS
from nanoinfer.quant.int4 import choose_int4_backend

# With neither --kv-cache-memory nor --max-model-len given, the pool is capped here: the model's
# full window x 64 sequences can be tens of GiB.
DEFAULT_KV_CAP_BYTES = 2 << 30
# registry.load_builtin gives every built-in GGUF model this default quantization.
BUILTIN_QUANTIZATION = "int4"
# The decoder-layer linears quantize_model swaps (nanoinfer.quant._PROJECTIONS).
PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
# Sampling works on float32 rows of the whole vocabulary: the logits, a working copy, the sorted
# values with their int64 order (top-k / top-p) and the probabilities, 4 + 4 + 4 + 8 + 4 bytes.
SAMPLER_BYTES_PER_LOGIT = 24


# ---- the KV pool ----------------------------------------------------------------------------------


def kv_pool_bytes(config: ModelConfig, dtype: torch.dtype, engine: EngineConfig, max_model_len: int) -> int:
    """Bytes of the paged KV pool the engine allocates for `config` (a rank's shard config where the
    model is split): `engine.kv_cache_memory` when given, else room for max_model_len x
    max_num_seqs tokens, at most DEFAULT_KV_CAP_BYTES when no max_model_len was asked for; rounded
    down to whole blocks, as PagedKVCache.for_memory allocates them. ValueError when not even one
    block fits."""
    per_token = kv_bytes_per_token(config, dtype)
    memory = engine.kv_cache_memory
    if memory is None:
        memory = per_token * max_model_len * engine.max_num_seqs
        if engine.max_model_len is None:
            memory = min(memory, DEFAULT_KV_CAP_BYTES)
    per_block = per_token * engine.block_size
    if memory < per_block:
        raise ValueError(
            f"KV cache memory {memory} bytes is less than one block ({per_block} bytes for {engine.block_size} tokens)"
        )
    return memory // per_block * per_block


def engine_max_model_len(config: ModelConfig, engine: EngineConfig) -> int:
    """The context window the engine serves (LLMEngine.max_model_len before the pool is made)."""
    return min(engine.max_model_len or config.max_position_embeddings, config.max_position_embeddings)


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
        return _element_size(self.activations)

    @property
    def weight_bytes(self) -> int:
        return _element_size(self.weights)


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


def _element_size(dtype: torch.dtype) -> int:
    return dtype.itemsize


def _dtype_name(dtype: torch.dtype) -> str:
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
        record = Q4_COLS * Q4_GROUP // 2 + 2 * 4 * Q4_COLS
        return (
            f"int4, groups of {group} (C kernel panels, float32 scale + min)",
            blocks * (in_features // Q4_GROUP) * record,
            True,
        )
    groups = -(-in_features // group)
    nibbles = out_features * (in_features // 2 if backend == "torch" else -(-in_features // 2))
    scales = groups * out_features * 2 * rt.act_bytes  # scales_and_zeros [G, N, 2]
    layout = "torch int4pack" if backend == "torch" else "packed nibbles"
    return f"int4, groups of {group} ({layout}, {_dtype_name(rt.activations)} scale + zero)", nibbles + scales, False


def _int8_bytes(out_features: int, in_features: int, group: int | None, rt: Runtime) -> tuple[str, int, bool]:
    """(format label, bytes, runs on our kernel) of Int8Linear (per channel, or in groups)."""
    scales = out_features * (in_features // group if group else 1) * rt.act_bytes
    grouping = f"groups of {group}" if group else "per channel"
    if rt.c_kernels and in_features % Q8_GROUP == 0:  # our panels: 8 columns x 32 k of int8, 8 float32 scales
        panels = -(-out_features // Q8_COLS) * (in_features // Q8_GROUP) * (Q8_COLS * Q8_GROUP + 4 * Q8_COLS)
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
        _add(weights, _dtype_name(rt.activations), n, n * rt.act_bytes, "biases")
    if rt.dense_above_rows is not None and not ours:
        label = f"{_dtype_name(rt.weights)} copies for batches over {rt.dense_above_rows} rows"
        _add(weights, label, n * k, n * k * rt.weight_bytes, what)


def _float_linear(weights: Weights, lin: _Linear, dtype: torch.dtype, rt: Runtime, what: str) -> None:
    """An unquantized linear: its weight in `dtype`; the bias float32 in a 16-bit HalfLinear,
    else in the compute dtype."""
    n, k = lin.out_features, lin.in_features
    _add(weights, _dtype_name(dtype), n * k, n * k * _element_size(dtype), what)
    if lin.bias:
        half = dtype != rt.activations
        bias_dtype = torch.float32 if half else rt.activations
        _add(weights, _dtype_name(bias_dtype), n, n * _element_size(bias_dtype), "biases")


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
    return "MLA query and latent projections (never quantized)"


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
            _add(weights, _dtype_name(rt.weights), values, values * rt.weight_bytes, "embedding")
        elif name.endswith("norm.weight"):  # norms stay float32 (Gemma's 1 + w needs the precision)
            _add(weights, "float32", values, values * 4, "norms")
        else:  # routers: bare parameters in the compute dtype, which quantization leaves alone
            _add(weights, _dtype_name(rt.activations), values, values * rt.act_bytes, "routers")
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
        else:  # MLA's q/kv projections are neither quantized nor narrowed: the compute dtype
            _float_linear(weights, lin, rt.activations, rt, _what(lin.path))
    if tied_head_rows is not None and quantized:  # an int8 copy of the embedding; unquantized, it is the head
        lin = _Linear("lm_head", tied_head_rows, config.hidden_size, False)
        group = HEAD_GROUP_SIZE if config.hidden_size % HEAD_GROUP_SIZE == 0 else None
        _quantized_linear(weights, lin, "int8", group, rt, "tied LM head (an int8 copy of the embedding)")
    return weights


# ---- activations ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Term:
    """One part of an estimate: a name, the arithmetic written out, and its bytes."""

    name: str
    formula: str
    bytes: int


def _n(x: int) -> str:
    return f"{x:,}"


def _attention_terms(c: ModelConfig, T: int, a: int) -> tuple[str, int]:
    """(formula, bytes) of one attention layer's intermediates for T rows."""
    if c.is_mla:
        H, rank, rope = c.num_heads, c.kv_lora_rank, c.qk_rope_head_dim
        qk, latent = c.qk_nope_head_dim + rope, rank + rope
        # q (and its low-rank input), the latent row, absorbed queries, latent results, values
        width = c.q_lora_rank + H * qk + latent + 2 * H * latent + H * c.v_head_dim
        q_lora = f"{_n(c.q_lora_rank)} + " if c.q_lora_rank else ""
        text = f"MLA {_n(T)} × ({q_lora}{H} × {qk} + {latent} + 2 × {H} × {latent} + {H} × {c.v_head_dim}) × {a}"
        return text, T * width * a
    width = c.q_size + 2 * c.kv_size + c.q_size  # fused q/k/v, then the attention output
    return f"q/k/v and output {_n(T)} × ({c.q_size} + 2 × {c.kv_size} + {c.q_size}) × {a}", T * width * a


def _mlp_terms(c: ModelConfig, layers: range, T: int, a: int) -> tuple[str, int]:
    """(formula, bytes) of the widest MLP among `layers`: gate/up and the gated activation (3 x
    width per row); a MoE layer adds its router's float32 scores, the T x k routed rows (gathered,
    computed, weighted) and its shared experts."""
    options: list[tuple[str, int]] = []
    if any(not c.is_moe_layer(i) for i in layers):
        options.append((f"MLP {_n(T)} × 3 × {_n(c.intermediate_size)} × {a}", T * 3 * c.intermediate_size * a))
    if any(c.is_moe_layer(i) for i in layers):
        k, E, width = c.num_experts_per_tok, c.num_experts, c.moe_intermediate_size
        shared = width * c.num_shared_experts
        total = T * (2 * E * 4 + 3 * k * c.hidden_size * a + 3 * width * a + 3 * shared * a)
        text = (
            f"MoE {_n(T)} × (2 × {E} × 4 + 3 × {k} × {_n(c.hidden_size)} × {a} + 3 × {width} × {a}"
            + (f" + 3 × {shared} × {a}" if shared else "")
            + ")"
        )
        options.append((text, total))
    return max(options, key=lambda o: o[1]) if options else ("no layers", 0)


def activation_terms(
    c: ModelConfig, layers: range, rt: Runtime, engine: EngineConfig, max_model_len: int, tp: int
) -> list[Term]:
    """An upper-ish estimate of one step's peak activation memory on a rank with shard config `c`
    running `layers`. A step has at most T = max_num_batched_tokens rows (decode rows count
    against that budget too) and R = min(max_num_seqs, T) rows that need logits. Counted:

    - hidden states: the residual stream, its normed copy, a block's output and their sum (4 x T x D);
    - RoPE's cos and sin for the step (x2 with Gemma's local tables);
    - one layer's intermediates, the larger of attention's (q/k/v and output; MLA's latent rows,
      absorbed queries, latent results and values) and the MLP's (gate/up and activation; MoE's
      routing and routed rows), since each layer frees its own before the next;
    - attention scratch: none on our C kernel, which reads the paged cache in place; the torch
      path (other dtypes and devices) gathers every decode row's context (R x KV heads x L x head
      dim, K and V) and repeats a prompt chunk's context to its query heads (2 x H x L x head dim);
    - logits and sampling: R rows of the whole vocabulary, SAMPLER_BYTES_PER_LOGIT bytes each
      (plus the gathered copy on tensor-parallel ranks).

    Allocator slack, the tokenizer and Python's own memory are not counted.
    """
    a = rt.act_bytes
    T, B = engine.max_num_batched_tokens, engine.max_num_seqs
    R, L, D, V = min(B, T), max_model_len, c.hidden_size, c.vocab_size
    tables = 2 if c.rope_local_theta is not None else 1
    attention, attention_bytes = _attention_terms(c, T, a)
    mlp, mlp_bytes = _mlp_terms(c, layers, T, a)
    larger = attention if attention_bytes >= mlp_bytes else mlp
    terms = [
        Term("hidden states", f"4 × {_n(T)} × {_n(D)} × {a}", 4 * T * D * a),
        Term("RoPE tables", f"{2 * tables} × {_n(T)} × {c.rope_dim} × {a}", 2 * tables * T * c.rope_dim * a),
        Term("layer intermediates", f"the larger of attention and MLP: {larger}", max(attention_bytes, mlp_bytes)),
    ]
    c_attention = rt.c_kernels and rt.activations == torch.float32 and rt.kv in KV_DTYPES
    if c_attention:
        terms.append(Term("attention scratch", "none, the C kernel reads K/V in place", 0))
    else:
        kv_rows = 1 if c.is_mla else 2  # MLA's values are a view of its latent rows
        decode = kv_rows * R * c.num_kv_heads * L * c.head_dim * a  # R: the step's decode rows at most
        prefill = 2 * c.num_heads * L * c.head_dim * a
        text = (
            f"{kv_rows} × {R} × {c.num_kv_heads} × {_n(L)} × {c.head_dim} × {a} + "
            f"2 × {c.num_heads} × {_n(L)} × {c.head_dim} × {a}"
        )
        terms.append(Term("attention scratch", text, decode + prefill))
    per_logit = SAMPLER_BYTES_PER_LOGIT + (8 if tp > 1 else 0)
    terms.append(Term("logits and sampling", f"{R} × {_n(V)} × {per_logit}", R * V * per_logit))
    return terms


# ---- plans ----------------------------------------------------------------------------------------


@dataclass
class RankPlan:
    """One rank's memory: its weights, KV cache and activations."""

    rank: int
    tp_rank: int
    stage: int
    layers: tuple[int, int]  # [start, end) of the model's layers
    holds: list[str]  # what it holds besides layers: embedding, final norm, LM head
    weights: Weights
    kv_bytes_per_token: int
    kv_formula: str
    kv_cache_bytes: int
    kv_blocks: int
    activations: list[Term]
    shard_config: ModelConfig  # the rank's heads and widths (all the model's layers)
    kv_config: ModelConfig  # the same over its stage's layers only: what its KV cache holds

    @property
    def weight_bytes(self) -> int:
        return sum(f.bytes for f in self.weights.values())

    @property
    def activation_bytes(self) -> int:
        return sum(t.bytes for t in self.activations)

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes + self.activation_bytes

    def figures(self) -> tuple[Any, ...]:
        """What two ranks must share to be printed as one."""
        weights = tuple((k, tuple((w, tuple(p)) for w, p in v.parts.items())) for k, v in self.weights.items())
        terms = tuple((t.name, t.formula) for t in self.activations)
        return (self.layers, tuple(self.holds), weights, self.kv_formula, self.kv_cache_bytes, terms)

    def to_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "tp_rank": self.tp_rank,
            "stage": self.stage,
            "layers": list(self.layers),
            "holds": self.holds,
            "weight_bytes": self.weight_bytes,
            "weights": {k: v.to_json() for k, v in self.weights.items()},
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "kv_formula": self.kv_formula,
            "kv_cache_bytes": self.kv_cache_bytes,
            "kv_blocks": self.kv_blocks,
            "activation_bytes": self.activation_bytes,
            "activations": {t.name: {"bytes": t.bytes, "formula": t.formula} for t in self.activations},
            "total_bytes": self.total_bytes,
        }


@dataclass(frozen=True)
class Fit:
    """What fits in `memory_bytes` per rank after weights and activations."""

    memory_bytes: int
    max_num_seqs: int | None  # the largest for the plan's max_model_len (None: not even one)
    max_model_len: int | None  # the largest for the plan's max_num_seqs, up to the model's window
    kv_tokens: int  # tokens the KV cache has room for at the plan's sizes

    def to_json(self) -> dict[str, Any]:
        return {
            "memory_bytes": self.memory_bytes,
            "max_num_seqs": self.max_num_seqs,
            "max_model_len": self.max_model_len,
            "kv_tokens": self.kv_tokens,
        }


@dataclass
class MemoryPlan:
    """A model's memory on every rank, for one set of engine settings."""

    meta: ModelMetadata
    engine: EngineConfig
    runtime: Runtime
    max_model_len: int
    tensor_parallel_size: int
    pipeline_parallel_size: int
    ranks: list[RankPlan]
    fit: Fit | None = None

    @property
    def largest(self) -> RankPlan:
        """The rank that needs the most: every rank's device must be this large."""
        return max(self.ranks, key=lambda r: r.total_bytes)

    def to_json(self) -> dict[str, Any]:
        """Settings, the largest rank's figures at the top level, every rank in `ranks`, the fit."""
        top, rt, e = self.largest, self.runtime, self.engine
        out: dict[str, Any] = {
            "model": self.meta.name,
            "source": self.meta.source,
            "metadata": self.meta.kind,
            "architecture": self.meta.config.architecture,
            "settings": {
                "dtype": e.dtype,
                "weight_dtype": _dtype_name(rt.weights),
                "activation_dtype": _dtype_name(rt.activations),
                "quantization": rt.quantization,
                "kv_cache_dtype": _dtype_name(rt.kv),
                "max_model_len": self.max_model_len,
                "max_num_seqs": e.max_num_seqs,
                "max_num_batched_tokens": e.max_num_batched_tokens,
                "block_size": e.block_size,
                "kv_cache_memory": e.kv_cache_memory,
                "device": rt.device,
                "c_kernels": rt.c_kernels,
                "tensor_parallel_size": self.tensor_parallel_size,
                "pipeline_parallel_size": self.pipeline_parallel_size,
            },
            "rank": top.rank,
            "weight_bytes": top.weight_bytes,
            "kv_bytes_per_token": top.kv_bytes_per_token,
            "kv_cache_bytes": top.kv_cache_bytes,
            "activation_bytes": top.activation_bytes,
            "total_bytes": top.total_bytes,
            "ranks": [r.to_json() for r in self.ranks],
        }
        if self.fit is not None:
            out["fit"] = self.fit.to_json()
        return out


def plan_memory(
    meta: ModelMetadata,
    engine: EngineConfig | None = None,
    tensor_parallel_size: int | None = None,
    pipeline_parallel_size: int | None = None,
    memory: int | None = None,
) -> MemoryPlan:
    """The memory every rank needs to serve `meta` with `engine`'s settings (default: the
    engine's defaults) and, given `memory` bytes per rank, what fits. Raises ModelLoadError for a
    model that cannot be split this way, ValueError for bad settings."""
    engine = engine or EngineConfig()
    # the engine's own sizes where it has them (EngineConfig grows them with parallelism)
    tp: int = getattr(engine, "tensor_parallel_size", 1) if tensor_parallel_size is None else tensor_parallel_size
    pp: int = getattr(engine, "pipeline_parallel_size", 1) if pipeline_parallel_size is None else pipeline_parallel_size
    _check_settings(engine, tp, pp, memory)
    config = meta.config
    rt = resolve_runtime(engine, meta.default_quantization)
    length = engine_max_model_len(config, engine)
    spans = [stage_layers(config.num_layers, pp, stage) for stage in range(pp)]
    full = expected_shapes(config)
    ranks = []
    for tp_rank in range(tp):  # shapes are cut once per TP rank, then shared out by stage
        shard_plan = plan_shard(config, tp_rank, tp)
        shapes = shard_shapes(full, config, shard_plan)
        for stage, span in enumerate(spans):
            ranks.append(_rank_plan(config, shard_plan, shapes, stage, pp, span, rt, engine, length))
    ranks.sort(key=lambda r: r.rank)
    plan = MemoryPlan(meta, engine, rt, length, tp, pp, ranks)
    if memory is not None:
        plan.fit = fit_memory(plan, memory)
    return plan


def _check_settings(engine: EngineConfig, tp: int, pp: int, memory: int | None) -> None:
    sizes = {
        "tensor_parallel_size": tp,
        "pipeline_parallel_size": pp,
        "max_num_seqs": engine.max_num_seqs,
        "max_num_batched_tokens": engine.max_num_batched_tokens,
        "block_size": engine.block_size,
        "max_model_len": engine.max_model_len or 1,
    }
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if memory is not None and memory < 1:
        raise ValueError(f"memory must be positive, got {memory}")


def _rank_plan(
    config: ModelConfig,
    shard_plan: ShardPlan,
    shapes: dict[str, tuple[int, ...]],
    stage: int,
    pp: int,
    span: tuple[int, int],
    rt: Runtime,
    engine: EngineConfig,
    max_model_len: int,
) -> RankPlan:
    where = PipelineStage(stage, pp, span)
    tied = config.tie_word_embeddings
    mine = {n: s for n, s in shapes.items() if where.holds(n)}
    holds = ["embedding", "final norm", "LM head"] if where.first else []
    weights = weight_formats(mine, config, rt, shard_plan.vocab_rows if tied and where.first else None)
    shard = shard_config(config, shard_plan)
    kv_config = where.kv_config(shard)
    per_token = kv_bytes_per_token(kv_config, rt.kv)
    pool = _pool_or_zero(kv_config, rt.kv, engine, max_model_len)
    return RankPlan(
        rank=stage * shard_plan.world + shard_plan.rank,
        tp_rank=shard_plan.rank,
        stage=stage,
        layers=span,
        holds=holds,
        weights=weights,
        kv_bytes_per_token=per_token,
        kv_formula=kv_formula(kv_config, rt.kv),
        kv_cache_bytes=pool,
        kv_blocks=pool // (per_token * engine.block_size),
        activations=activation_terms(shard, range(*span), rt, engine, max_model_len, shard_plan.world),
        shard_config=shard,
        kv_config=kv_config,
    )


def _pool_or_zero(config: ModelConfig, dtype: torch.dtype, engine: EngineConfig, max_model_len: int) -> int:
    """kv_pool_bytes, or 0 where not one block fits (the engine would refuse to start)."""
    try:
        return kv_pool_bytes(config, dtype, engine, max_model_len)
    except ValueError:
        return 0


def kv_formula(config: ModelConfig, dtype: torch.dtype) -> str:
    """The seeds' KV cache formula with this config's numbers, ending in its bytes per token."""
    c, size, name = config, _element_size(dtype), _dtype_name(dtype)
    total = _n(kv_bytes_per_token(c, dtype))
    if c.is_mla:
        return (
            f"{c.num_layers} layers × ({c.kv_lora_rank} kv_lora_rank + {c.qk_rope_head_dim} qk_rope_head_dim)"
            f" × {size} bytes ({name}) = {total} bytes"
        )
    return (
        f"2 (K and V) × {c.num_layers} layers × {c.num_kv_heads} KV heads × {c.head_dim} head_dim"
        f" × {size} bytes ({name}) = {total} bytes"
    )


# ---- what fits ------------------------------------------------------------------------------------


def _rank_bytes(rank: RankPlan, plan: MemoryPlan, max_model_len: int, max_num_seqs: int) -> int | None:
    """A rank's bytes at these sizes, its pool sized as the engine sizes it; None: not one block."""
    engine = dataclasses.replace(
        plan.engine, max_model_len=max_model_len, max_num_seqs=max_num_seqs, kv_cache_memory=None
    )
    try:
        pool = kv_pool_bytes(rank.kv_config, plan.runtime.kv, engine, max_model_len)
    except ValueError:
        return None
    terms = activation_terms(
        rank.shard_config, range(*rank.layers), plan.runtime, engine, max_model_len, plan.tensor_parallel_size
    )
    return rank.weight_bytes + pool + sum(t.bytes for t in terms)


def _fits(plan: MemoryPlan, memory: int, max_model_len: int, max_num_seqs: int) -> bool:
    for rank in plan.ranks:
        total = _rank_bytes(rank, plan, max_model_len, max_num_seqs)
        if total is None or total > memory:
            return False
    return True


def _largest(fits: Callable[[int], bool], low: int, high: int | None) -> int | None:
    """The largest n in [low, high] (high None: no bound) with fits(n); None where not even `low`
    fits. fits must be monotone over that range."""
    if (high is not None and low > high) or not fits(low):
        return None
    good, bad = low, None
    while bad is None:  # double until it fails or reaches the bound
        probe = good * 2 if high is None else min(good * 2, high)
        if probe == good or probe > 1 << 40:
            return good
        if fits(probe):
            good = probe
        else:
            bad = probe
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def fit_memory(plan: MemoryPlan, memory: int) -> Fit:
    """With `memory` bytes on every rank: the largest max_num_seqs for the plan's max_model_len,
    the largest max_model_len (up to the model's window) for its max_num_seqs, and the KV tokens
    that fit beside weights and activations at the plan's sizes."""
    L, B, block = plan.max_model_len, plan.engine.max_num_seqs, plan.engine.block_size
    # Below one block's worth of tokens the engine refuses to start: search from there up.
    seqs = _largest(lambda b: _fits(plan, memory, L, b), -(-block // L), None)
    window = plan.meta.config.max_position_embeddings
    length = _largest(lambda n: _fits(plan, memory, n, B), -(-block // B), window)
    tokens = []
    for rank in plan.ranks:
        left = memory - rank.weight_bytes - rank.activation_bytes
        tokens.append(max(left, 0) // (rank.kv_bytes_per_token * block) * block)
    return Fit(memory, seqs, length, min(tokens))


# ---- text -----------------------------------------------------------------------------------------

_WIDTH = 100  # the column sizes are right-aligned to


def format_bytes(n: int) -> str:
    """Binary units, as --memory and --kv-cache-memory read them (GiB = 2**30 bytes)."""
    if n < 1024:
        return f"{n:,} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:,.2f} {unit}"


def _line(text: str, nbytes: int) -> str:
    size = format_bytes(nbytes)
    return f"{text}{' ' * max(1, _WIDTH - len(text) - len(size))}{size}"


def _spans(ids: list[int]) -> str:
    """Sorted numbers as runs: 0-3, 6, 8-9."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _rank_names(ranks: list[RankPlan]) -> str:
    ids = [r.rank for r in ranks]
    return f"rank {ids[0]}" if len(ids) == 1 else f"ranks {_spans(ids)}"


def format_plan(plan: MemoryPlan) -> str:
    """The plan as text: the model and settings, each distinct rank, then what fits."""
    c, rt, e = plan.meta.config, plan.runtime, plan.engine
    if c.is_mla:
        heads = f"{c.num_heads} heads over one latent KV row of {c.kv_lora_rank} + {c.qk_rope_head_dim}"
    else:
        heads = f"{c.num_heads} heads and {c.num_kv_heads} KV heads of {c.head_dim}"
    shape = (
        f"{c.num_layers} layers, hidden {_n(c.hidden_size)}, {heads}, vocabulary {_n(c.vocab_size)},"
        f" context {_n(c.max_position_embeddings)}"
    )
    if c.num_experts:
        shape += f", {c.num_experts} experts (top {c.num_experts_per_tok})"
    quant = rt.quantization + (" (the model's default)" if e.quantization is None else "")
    length = f"{_n(plan.max_model_len)}" + ("" if e.max_model_len else " (the model's)")
    lines = [
        f"{plan.meta.name}: {c.architecture}, from the {plan.meta.kind} of {plan.meta.source}",
        f"  {shape}",
        f"  dtype {e.dtype} (weights {_dtype_name(rt.weights)}, activations {_dtype_name(rt.activations)}),"
        f" quantization {quant}, KV cache {_dtype_name(rt.kv)} ({e.kv_cache_dtype}),"
        f" device {rt.device}{' with the C kernels' if rt.c_kernels else ''}",
        f"  max_model_len {length}, max_num_seqs {e.max_num_seqs},"
        f" max_num_batched_tokens {_n(e.max_num_batched_tokens)}, block_size {e.block_size},"
        f" tensor_parallel_size {plan.tensor_parallel_size}, pipeline_parallel_size {plan.pipeline_parallel_size}",
    ]
    groups: dict[tuple[Any, ...], list[RankPlan]] = {}
    for rank in plan.ranks:
        groups.setdefault(rank.figures(), []).append(rank)
    for members in groups.values():
        lines += ["", *_format_rank(members, plan)]
    if plan.fit is not None:
        lines += ["", *_format_fit(plan, plan.fit)]
    return "\n".join(lines)


def _format_rank(members: list[RankPlan], plan: MemoryPlan) -> list[str]:
    r, e = members[0], plan.engine
    where = []
    if plan.tensor_parallel_size > 1:
        tp_ranks = [m.tp_rank for m in members]
        where.append(f"TP rank {tp_ranks[0]}" if len(tp_ranks) == 1 else f"TP ranks {_spans(tp_ranks)}")
    if plan.pipeline_parallel_size > 1:
        where.append(f"stage {r.stage}")
    where.append(f"layers {r.layers[0]}-{r.layers[1] - 1}")
    where += r.holds
    lines = [f"{_rank_names(members)} ({', '.join(where)})", _line("  weights", r.weight_bytes)]
    for label, fmt in r.weights.items():
        lines.append(_line(f"    {label}", fmt.bytes))
        lines += [_line(f"      {what}: {_n(p)} values", b) for what, (p, b) in fmt.parts.items()]
    lines.append(f"  KV cache per token = {r.kv_formula}")
    if e.kv_cache_memory is not None:
        asked = f"--kv-cache-memory {format_bytes(e.kv_cache_memory)}"
    else:
        asked = f"{_n(plan.max_model_len)} tokens × {e.max_num_seqs} sequences"
        if (
            e.max_model_len is None
            and r.kv_bytes_per_token * plan.max_model_len * e.max_num_seqs > DEFAULT_KV_CAP_BYTES
        ):
            asked += f", capped at {format_bytes(DEFAULT_KV_CAP_BYTES)} without --max-model-len"
    blocks = f"{_n(r.kv_blocks)} blocks of {e.block_size} = {_n(r.kv_blocks * e.block_size)} tokens"
    lines.append(_line(f"  KV cache for {asked}: {blocks}", r.kv_cache_bytes))
    lines.append(_line("  activations, peak of one step (estimate)", r.activation_bytes))
    lines += [_line(f"    {t.name}: {t.formula}", t.bytes) for t in r.activations]
    lines.append(_line("  total", r.total_bytes))
    return lines


def _format_fit(plan: MemoryPlan, fit: Fit) -> list[str]:
    L, B = plan.max_model_len, plan.engine.max_num_seqs
    window = plan.meta.config.max_position_embeddings
    lines = [
        f"in {format_bytes(fit.memory_bytes)} per rank, beside weights and activations:",
        f"  the KV cache has room for {_n(fit.kv_tokens)} tokens",
    ]
    if fit.max_num_seqs is None:
        lines.append(f"  at max_model_len {_n(L)}: not even one sequence fits")
    else:
        lines.append(f"  at max_model_len {_n(L)}: max_num_seqs up to {_n(fit.max_num_seqs)}")
    if fit.max_model_len is None:
        lines.append(f"  at max_num_seqs {B}: not even one block fits")
    else:
        whole = " (the model's whole window)" if fit.max_model_len == window else ""
        lines.append(f"  at max_num_seqs {B}: max_model_len up to {_n(fit.max_model_len)}{whole}")
    return lines
