"""Building blocks of the decoder layer: RMSNorm, attention over the paged KV cache, gated MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoinfer.config import ModelConfig
from nanoinfer.kernels import KV_DTYPES, CpuKernels, kernels
from nanoinfer.model.forward_batch import ForwardBatch
from nanoinfer.model.kv_cache import read_slots, write_slots
from nanoinfer.model.rope import apply_rotary


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32. Gemma's (1 + w) offset is folded into `weight` at load."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        # Kept in float32 whatever the model dtype: a bf16 (1 + w) would lose Gemma's small offsets.
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Runs twice per layer per step, so per-call overhead counts: our C kernel has far less
        # (docs/performance.md, "Small ops").
        # The C kernels have no backward: training (grad enabled) takes torch ops.
        fast = x.dtype == torch.float32 and x.device.type == "cpu" and x.is_contiguous() and not torch.is_grad_enabled()
        ours = kernels() if fast else None
        if ours is not None:
            return ours.rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x.float(), self.weight.shape, self.weight, self.eps).to(x.dtype)


class PagedAttention(nn.Module):
    """Attention in torch ops over the paged KV cache, shared by `Attention` and MLA's
    `MLAttention`; a subclass sets num_heads, num_kv_heads, scale and sliding."""

    num_heads: int
    num_kv_heads: int
    scale: float
    sliding: bool

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: ForwardBatch,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        """Attention in torch ops (SDPA) of q [T, H, d] over k/v [T, KVH, d or dv] and the paged
        caches: the path for other dtypes and devices, and for MLA. Returns [T, H, dv]."""
        out = q.new_empty(*q.shape[:2], v.shape[-1])
        D = batch.num_decode
        if D:
            out[:D] = self._decode_sdpa(q[:D], batch, k_cache, v_cache)
        for span in batch.prefills:
            rows = slice(span.start, span.start + span.length)
            mask = span.sliding_mask if self.sliding and span.sliding_mask is not None else span.mask
            if span.mask is None:  # fresh prompt: its own K/V are the whole context
                keys, values = k[rows].transpose(0, 1), v[rows].transpose(0, 1)
            else:
                keys = read_slots(k_cache, span.context_slots).transpose(0, 1).to(q.dtype)
                values = read_slots(v_cache, span.context_slots).transpose(0, 1).to(q.dtype)
            out[rows] = self._prefill_sdpa(q[rows].transpose(0, 1), keys, values, mask).transpose(0, 1)
        return out

    def _decode_sdpa(
        self, q: torch.Tensor, batch: ForwardBatch, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> torch.Tensor:
        """One SDPA call for every decode row q [D, H, d] over its context in the caches."""
        # [D, ctx, kv_heads, hd] -> [D, kv_heads, ctx, hd]
        keys = self._gather_blocks(k_cache, batch).to(q.dtype)
        values = self._gather_blocks(v_cache, batch).to(q.dtype)
        sliding_mask = batch.decode_sliding_mask
        mask = sliding_mask if self.sliding and sliding_mask is not None else batch.decode_mask
        o = F.scaled_dot_product_attention(
            q.unsqueeze(2), keys, values, attn_mask=mask, scale=self.scale, enable_gqa=True
        )
        return o.squeeze(2)

    def _prefill_sdpa(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """SDPA of q [H, T, hd] over keys/values [KVH, ctx, hd]. K/V heads are repeated and a batch
        dim added: torch's CPU flash kernel takes only 4-D inputs with equal head counts, and is
        much faster than the 3-D enable_gqa path (docs/performance.md, "Small ops")."""
        group = self.num_heads // self.num_kv_heads
        if group > 1:
            keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
        o = F.scaled_dot_product_attention(
            q.unsqueeze(0),
            keys.unsqueeze(0),
            values.unsqueeze(0),
            attn_mask=mask,
            is_causal=mask is None,
            scale=self.scale,
        )
        return o[0]

    def _gather_blocks(self, cache: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """[D, kv_heads, ctx, hd] context of every decode row, read block by block from the cache."""
        D, bs = batch.num_decode, batch.block_size
        # index_select of whole blocks beats advanced indexing (docs/performance.md, "Small ops")
        tables = batch.block_tables[:D, : -(-batch.decode_ctx // bs)]  # prompt chunks may be longer
        blocks = torch.index_select(cache, 0, tables.flatten())  # [D * n, kv_heads, bs, hd]
        blocks = blocks.view(D, -1, self.num_kv_heads, bs, cache.shape[-1]).transpose(1, 2)
        return blocks.flatten(2, 3)[:, :, : batch.decode_ctx]


class Attention(PagedAttention):
    """Multi-head attention with GQA/MQA; writes K/V into the paged cache and reads the context from it."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_size, self.kv_size, self.scale = c.q_size, c.kv_size, c.scale
        self.sliding = c.is_sliding(layer)
        self.window = c.sliding_window if self.sliding and c.sliding_window else 0  # 0: full attention
        # q, k and v share one matmul: one kernel launch instead of three per layer. The projections
        # are nn.Linear until nanoinfer.quant swaps in quantized or 16-bit modules.
        self.qkv_proj: nn.Module = nn.Linear(c.hidden_size, c.q_size + 2 * c.kv_size, bias=c.attention_bias)
        self.o_proj: nn.Module = nn.Linear(c.q_size, c.hidden_size, bias=False)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps) if c.qk_norm else None
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps) if c.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        batch: ForwardBatch,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        T = x.shape[0]
        qkv = self.qkv_proj(x)
        kernel_dtypes = qkv.dtype == torch.float32 and qkv.device.type == "cpu" and k_cache.dtype in KV_DTYPES
        ours = kernels() if kernel_dtypes else None
        if ours is not None:
            # One C call for norm + RoPE + cache write, in place on the fused projection; then every
            # row, decode step or prompt token, attends in place over the paged cache with its
            # queries read straight from qkv (faster than torch's SDPA on prompts too:
            # docs/performance.md, "Attention").
            qn, kn = self.q_norm, self.k_norm
            ours.qk_rope_store(
                qkv,
                self.num_heads,
                self.num_kv_heads,
                self.head_dim,
                None if qn is None else qn.weight,
                None if kn is None else kn.weight,
                0.0 if qn is None else qn.eps,
                *rope,
                k_cache,
                v_cache,
                batch.slot_mapping,
            )
            return self.o_proj(self._attention_kernel(ours, qkv, batch, k_cache, v_cache))
        q, k, v = self._torch_qkv(qkv, rope)
        write_slots(k_cache, batch.slot_mapping, k)
        write_slots(v_cache, batch.slot_mapping, v)
        out = self._attend(q, k, v, batch, k_cache, v_cache)
        return self.o_proj(out.reshape(T, self.q_size))

    def forward_dense(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Causal self-attention over whole sequences x [B, T, D], no cache: the training path.

        `mask` [T, T] (True: may attend) narrows causal attention to a sliding window; None: causal."""
        B, T, _ = x.shape
        q, k, v = self._torch_qkv(self.qkv_proj(x), rope)  # [B, T, heads, hd]
        group = self.num_heads // self.num_kv_heads
        k, v = (t.transpose(1, 2).repeat_interleave(group, 1) for t in (k, v))
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale
        )
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.q_size))

    def _split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views q [T, H, hd], k and v [T, KVH, hd] of the fused projection."""
        hd = self.head_dim
        return tuple(t.unflatten(-1, (-1, hd)) for t in qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1))

    def _torch_qkv(
        self, qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k (normed if so, rotated) and v, in torch ops: the path for other dtypes and devices."""
        q, k, v = self._split(qkv)
        if self.q_norm is not None and self.k_norm is not None:  # both or neither (config.qk_norm)
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rotary(q, *rope), apply_rotary(k, *rope), v

    def _attention_kernel(
        self, ours: CpuKernels, qkv: torch.Tensor, batch: ForwardBatch, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> torch.Tensor:
        """[T, H * hd] attention of every row of qkv, reading K/V in place from the cache blocks."""
        return ours.paged_attention(
            qkv,
            self.num_heads,
            k_cache,
            v_cache,
            batch.block_tables,
            batch.ctx_lens,
            self.window,
            self.scale,
            batch.table_of_row,
        )


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); SwiGLU with silu, GeGLU with gelu-tanh."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.intermediate = config.intermediate_size
        # nn.Linear until nanoinfer.quant swaps in quantized or 16-bit modules
        self.gate_up_proj: nn.Module = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj: nn.Module = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gelu = config.activation == "gelu_tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if (
            gate_up.dtype == torch.float32
            and gate_up.dim() == 2
            and gate_up.device.type == "cpu"
            and not torch.is_grad_enabled()
        ):
            ours = kernels()
            if ours is not None:
                return self.down_proj(ours.gated_act(gate_up, self.gelu))
        gate, up = gate_up.split(self.intermediate, dim=-1)
        act = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.down_proj(act * up)
