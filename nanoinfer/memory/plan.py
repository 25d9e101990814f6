"""Per-rank plans: weights, KV cache and activations of every tensor x pipeline rank, and what fits."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from nanoinfer.config import EngineConfig, ModelConfig
from nanoinfer.loading.package import expected_shapes
from nanoinfer.memory.activations import Term, activation_terms, thousands
from nanoinfer.memory.metadata import ModelMetadata
from nanoinfer.memory.pool import engine_max_model_len, kv_pool_bytes
from nanoinfer.memory.weights import Runtime, Weights, dtype_name, element_size, resolve_runtime, weight_formats
from nanoinfer.model.kv_cache import kv_bytes_per_token
from nanoinfer.model.parallel import PipelineStage, ShardPlan, plan_shard, shard_config, shard_shapes, stage_layers

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
                "weight_dtype": dtype_name(rt.weights),
                "activation_dtype": dtype_name(rt.activations),
                "quantization": rt.quantization,
                "kv_cache_dtype": dtype_name(rt.kv),
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
    c, size, name = config, element_size(dtype), dtype_name(dtype)
    total = thousands(kv_bytes_per_token(c, dtype))
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
