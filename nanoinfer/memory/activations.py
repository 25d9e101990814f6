"""An estimate of one step's peak activation memory."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoinfer.config import EngineConfig, ModelConfig
from nanoinfer.kernels import KV_DTYPES
from nanoinfer.memory.weights import Runtime

# Sampling works on float32 rows of the whole vocabulary: the logits, a working copy, the sorted
# values with their int64 order (top-k / top-p) and the probabilities, 4 + 4 + 4 + 8 + 4 bytes.
SAMPLER_BYTES_PER_LOGIT = 24

# ---- activations ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Term:
    """One part of an estimate: a name, the arithmetic written out, and its bytes."""

    name: str
    formula: str
    bytes: int


def thousands(x: int) -> str:
    return f"{x:,}"


def _attention_terms(c: ModelConfig, T: int, a: int) -> tuple[str, int]:
    """(formula, bytes) of one attention layer's intermediates for T rows."""
    if c.is_mla:
        H, rank, rope = c.num_heads, c.kv_lora_rank, c.qk_rope_head_dim
        qk, latent = c.qk_nope_head_dim + rope, rank + rope
        # q (and its low-rank input), the latent row, absorbed queries, latent results, values
        width = c.q_lora_rank + H * qk + latent + 2 * H * latent + H * c.v_head_dim
        q_lora = f"{thousands(c.q_lora_rank)} + " if c.q_lora_rank else ""
        text = f"MLA {thousands(T)} × ({q_lora}{H} × {qk} + {latent} + 2 × {H} × {latent} + {H} × {c.v_head_dim}) × {a}"
        return text, T * width * a
    width = c.q_size + 2 * c.kv_size + c.q_size  # fused q/k/v, then the attention output
    return f"q/k/v and output {thousands(T)} × ({c.q_size} + 2 × {c.kv_size} + {c.q_size}) × {a}", T * width * a


def _mlp_terms(c: ModelConfig, layers: range, T: int, a: int) -> tuple[str, int]:
    """(formula, bytes) of the widest MLP among `layers`: gate/up and the gated activation (3 x
    width per row); a MoE layer adds its router's float32 scores, the T x k routed rows (gathered,
    computed, weighted) and its shared experts."""
    options: list[tuple[str, int]] = []
    if any(not c.is_moe_layer(i) for i in layers):
        options.append(
            (f"MLP {thousands(T)} × 3 × {thousands(c.intermediate_size)} × {a}", T * 3 * c.intermediate_size * a)
        )
    if any(c.is_moe_layer(i) for i in layers):
        k, E, width = c.num_experts_per_tok, c.num_experts, c.moe_intermediate_size
        shared = width * c.num_shared_experts
        total = T * (2 * E * 4 + 3 * k * c.hidden_size * a + 3 * width * a + 3 * shared * a)
        text = (
            f"MoE {thousands(T)} × (2 × {E} × 4 + 3 × {k} × {thousands(c.hidden_size)} × {a} + 3 × {width} × {a}"
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
        Term("hidden states", f"4 × {thousands(T)} × {thousands(D)} × {a}", 4 * T * D * a),
        Term("RoPE tables", f"{2 * tables} × {thousands(T)} × {c.rope_dim} × {a}", 2 * tables * T * c.rope_dim * a),
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
            f"{kv_rows} × {R} × {c.num_kv_heads} × {thousands(L)} × {c.head_dim} × {a} + "
            f"2 × {c.num_heads} × {thousands(L)} × {c.head_dim} × {a}"
        )
        terms.append(Term("attention scratch", text, decode + prefill))
    per_logit = SAMPLER_BYTES_PER_LOGIT + (8 if tp > 1 else 0)
    terms.append(Term("logits and sampling", f"{R} × {thousands(V)} × {per_logit}", R * V * per_logit))
    return terms
