"""ModelPackage, what every loader produces, and the weight shapes a config requires."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nanoinfer.config import GenerationDefaults, ModelConfig

if TYPE_CHECKING:
    import torch

    from nanoinfer.tokenizer import Tokenizer


# Applied to each weight as a loader reads it, before the next is read: (canonical name, whole
# tensor, the model's config) -> the tensor to keep, or None to drop it. A tensor-parallel rank
# keeps only its shard and a pipeline stage only its layers, so no rank holds the whole model.
WeightFilter = Callable[[str, "torch.Tensor", ModelConfig], "torch.Tensor | None"]


@dataclass
class ModelPackage:
    """Everything needed to serve one model: architecture, weights, tokenizer, generation defaults."""

    config: ModelConfig
    weights: dict[str, torch.Tensor]  # canonical names (docs/contracts.md) -> float tensors
    tokenizer: Tokenizer
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)
    source: str = ""  # the path (or built-in name) it was loaded from
    file_type: str = ""  # e.g. "Q4_1", "Q4_K_M", "bfloat16"
    default_quantization: str = "none"  # weight format the engine uses unless told otherwise
    weight_filter: WeightFilter | None = None  # what the loader kept of each weight (None: all of it)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical weight name -> shape this config requires."""
    c = config
    shapes: dict[str, tuple[int, ...]] = {
        "embed.weight": (c.vocab_size, c.hidden_size),
        "norm.weight": (c.hidden_size,),
    }
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    for i in range(c.num_layers):
        p = f"layers.{i}."
        shapes.update({p + "input_norm.weight": (c.hidden_size,), p + "pre_mlp_norm.weight": (c.hidden_size,)})
        shapes.update(_mla_shapes(p, c) if c.is_mla else _attention_shapes(p, c))
        if c.is_moe_layer(i):
            shapes[p + "mlp.router.weight"] = (c.num_experts, c.hidden_size)
            if c.router_correction_bias:
                shapes[p + "mlp.router.correction_bias"] = (c.num_experts,)
            if c.num_shared_experts:
                width = c.moe_intermediate_size * c.num_shared_experts
                shapes.update(_mlp_shapes(p + "mlp.shared_experts.", c.hidden_size, width))
            for e in range(c.num_experts):
                shapes.update(_mlp_shapes(f"{p}mlp.experts.{e}.", c.hidden_size, c.moe_intermediate_size))
        else:
            shapes.update(_mlp_shapes(p + "mlp.", c.hidden_size, c.intermediate_size))
        if c.attention_bias:
            shapes.update(
                {
                    p + "attn.q_proj.bias": (c.q_size,),
                    p + "attn.k_proj.bias": (c.kv_size,),
                    p + "attn.v_proj.bias": (c.kv_size,),
                }
            )
        if c.qk_norm:
            shapes.update({p + "attn.q_norm.weight": (c.head_dim,), p + "attn.k_norm.weight": (c.head_dim,)})
        if c.post_norms:
            shapes.update({p + "post_attn_norm.weight": (c.hidden_size,), p + "post_mlp_norm.weight": (c.hidden_size,)})
    return shapes


def _mlp_shapes(prefix: str, hidden: int, inter: int) -> dict[str, tuple[int, ...]]:
    return {
        prefix + "gate_proj.weight": (inter, hidden),
        prefix + "up_proj.weight": (inter, hidden),
        prefix + "down_proj.weight": (hidden, inter),
    }


def _attention_shapes(p: str, c: ModelConfig) -> dict[str, tuple[int, ...]]:
    return {
        p + "attn.q_proj.weight": (c.q_size, c.hidden_size),
        p + "attn.k_proj.weight": (c.kv_size, c.hidden_size),
        p + "attn.v_proj.weight": (c.kv_size, c.hidden_size),
        p + "attn.o_proj.weight": (c.hidden_size, c.q_size),
    }


def _mla_shapes(p: str, c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Multi-head latent attention's projections (see model/mla.py)."""
    qk, H = c.qk_nope_head_dim + c.qk_rope_head_dim, c.num_heads
    shapes: dict[str, tuple[int, ...]] = {
        p + "attn.kv_a_proj.weight": (c.kv_lora_rank + c.qk_rope_head_dim, c.hidden_size),
        p + "attn.kv_a_norm.weight": (c.kv_lora_rank,),
        p + "attn.kv_b_proj.weight": (H * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank),
        p + "attn.o_proj.weight": (c.hidden_size, H * c.v_head_dim),
    }
    if c.q_lora_rank:
        shapes[p + "attn.q_a_proj.weight"] = (c.q_lora_rank, c.hidden_size)
        shapes[p + "attn.q_a_norm.weight"] = (c.q_lora_rank,)
        shapes[p + "attn.q_b_proj.weight"] = (H * qk, c.q_lora_rank)
    else:
        shapes[p + "attn.q_proj.weight"] = (H * qk, c.hidden_size)
    return shapes


def fused_parts(config: ModelConfig, layer: str, fused: str) -> dict[str, tuple[int, int]]:
    """Phi-3 checkpoints keep q/k/v in one tensor ("qkv") and gate/up in another ("gate_up"):
    each part's canonical name in `layer` and its rows (start, end) of the fused tensor."""
    c = config
    if fused == "qkv":
        sizes = {"attn.q_proj": c.q_size, "attn.k_proj": c.kv_size, "attn.v_proj": c.kv_size}
    else:
        sizes = {"mlp.gate_proj": c.intermediate_size, "mlp.up_proj": c.intermediate_size}
    parts, start = {}, 0
    for part, n in sizes.items():
        parts[f"layers.{layer}.{part}.weight"] = (start, start + n)
        start += n
    return parts
