"""Multi-head latent attention (DeepSeek-V2/V3): keys and values are rebuilt from a small latent.

Per token the layer projects hidden states to c_kv (kv_lora_rank values, RMS-normed) and one
decoupled RoPE key k_pe (qk_rope_head_dim values, shared by every head). The cache stores just
that row, [c_kv, k_pe], instead of per-head K and V: kv_lora_rank + qk_rope_head_dim values per
token per layer. Per head, K = [W_UK c_kv, k_pe] and V = W_UV c_kv, with W_UK and W_UV the two
halves of kv_b_proj. Attention runs in the absorbed form, for prompts and decode alike:

    q_nope . (W_UK c) = (W_UK^T q_nope) . c        softmax(...) @ (W_UV c) = W_UV (softmax(...) @ c)

so each head's query becomes [W_UK^T q_nope, q_pe], attends over the cached latent rows
themselves (values: their c_kv part), and W_UV maps the result back: per-head K and V are never
built for cached tokens. (Training runs the expanded form: per-head K and V from the latent.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoinfer.config import ModelConfig
from nanoinfer.kernels import KV_DTYPES, kernels
from nanoinfer.model.forward_batch import ForwardBatch
from nanoinfer.model.kv_cache import write_slots
from nanoinfer.model.layers import PagedAttention, RMSNorm
from nanoinfer.model.rope import apply_rotary


class MLAttention(PagedAttention):
    """One MLA layer: the latent cache row per token, absorbed attention (see the module docstring)."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        c = config
        H, self.nope, self.rope_dim, self.v_dim = c.num_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.rank, self.interleave = c.kv_lora_rank, c.rope_interleave
        self.num_heads, self.num_kv_heads, self.scale = H, 1, c.scale
        self.sliding, self.window = False, 0
        qk = self.nope + self.rope_dim
        bias = c.attention_bias
        # queries from a low-rank bottleneck (q_a -> norm -> q_b), or straight (q_proj)
        self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=bias) if c.q_lora_rank else None
        self.q_a_norm = RMSNorm(c.q_lora_rank, c.rms_norm_eps) if c.q_lora_rank else None
        self.q_b_proj = nn.Linear(c.q_lora_rank, H * qk, bias=False) if c.q_lora_rank else None
        self.q_proj = None if c.q_lora_rank else nn.Linear(c.hidden_size, H * qk, bias=False)
        self.kv_a_proj: nn.Module = nn.Linear(c.hidden_size, self.rank + self.rope_dim, bias=bias)
        self.kv_a_norm = RMSNorm(self.rank, c.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.rank, H * (self.nope + self.v_dim), bias=False)
        self.o_proj: nn.Module = nn.Linear(H * self.v_dim, c.hidden_size, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        batch: ForwardBatch,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        T, H = x.shape[0], self.num_heads
        q_nope, q_pe, latent = self._project(x, rope)  # [T, H, nope], [T, H, rope], [T, rank + rope]
        write_slots(k_cache, batch.slot_mapping, latent[:, None])
        q = self._absorbed_queries(q_nope, q_pe)  # [T, H, rank + rope]
        # Absorbed for every row, prompts included: the expanded form measured no faster for
        # prompts (docs/performance.md, "Multi-head latent attention").
        ours = kernels() if x.dtype == torch.float32 and x.device.type == "cpu" and k_cache.dtype in KV_DTYPES else None
        if ours is not None:
            # Our paged kernel reads the latent rows in place as keys and again as values (the
            # cache passed twice); the values' last rope columns come out too and are dropped.
            out = ours.paged_attention(
                q.reshape(T, -1), H, k_cache, k_cache, batch.block_tables, batch.ctx_lens, 0, self.scale,
                batch.table_of_row,
            ).view(T, H, -1)[..., : self.rank]  # fmt: skip
        else:
            head = latent[:, None]  # [T, 1, rank + rope]: one "KV head"
            out = self._attend(q, head, head[..., : self.rank], batch, k_cache, k_cache[..., : self.rank])
        return self.o_proj(self._values(out).reshape(T, -1))

    def forward_dense(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Causal attention over whole sequences x [B, T, D], no cache (training)."""
        B, T, _ = x.shape
        cos, sin = rope  # [T, 1, rope] for one sequence: repeated for the B flattened ones
        q_nope, q_pe, latent = self._project(x.reshape(B * T, -1), (cos.repeat(B, 1, 1), sin.repeat(B, 1, 1)))
        shape = (B, T, self.num_heads, -1)
        out = self._expanded(q_nope.view(shape), q_pe.view(shape), latent.view(B, T, -1))
        return self.o_proj(out.reshape(B, T, -1))

    def _expanded(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """Causal attention of whole sequences in the expanded form: per-head K and V built from
        the latent. q_nope/q_pe [B, T, H, .], latent [B, T, rank + rope] -> [B, T, H, v]."""
        B, T, H = q_nope.shape[:3]
        k_nope, v = self.kv_b_proj(latent[..., : self.rank]).view(B, T, H, -1).split([self.nope, self.v_dim], -1)
        k = torch.cat([k_nope, latent[:, :, None, self.rank :].expand(-1, -1, H, -1)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=self.scale
        )
        return o.transpose(1, 2)

    def _absorbed_queries(self, q_nope: torch.Tensor, q_pe: torch.Tensor) -> torch.Tensor:
        """[W_UK^T q_nope, q_pe] per head: [T, H, rank + rope]."""
        w_uk, _ = self._up_projections()
        return torch.cat([torch.einsum("thn,hnr->thr", q_nope, w_uk), q_pe], dim=-1)

    def _values(self, attended: torch.Tensor) -> torch.Tensor:
        """Latent attention results [T, H, rank] -> per-head values [T, H, v] through W_UV."""
        _, w_uv = self._up_projections()
        return torch.einsum("thr,hvr->thv", attended, w_uv)

    def _project(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows x [T, D] -> q_nope [T, H, nope], rotated q_pe [T, H, rope], latent [T, rank + rope]."""
        T = x.shape[0]
        if self.q_a_proj is not None and self.q_a_norm is not None and self.q_b_proj is not None:
            q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))
        else:
            assert self.q_proj is not None
            q = self.q_proj(x)
        q_nope, q_pe = q.view(T, self.num_heads, -1).split([self.nope, self.rope_dim], dim=-1)
        c_kv, k_pe = self.kv_a_proj(x).split([self.rank, self.rope_dim], dim=-1)
        k_pe = self._rotate(k_pe[:, None], rope)[:, 0]
        return q_nope, self._rotate(q_pe, rope), torch.cat([self.kv_a_norm(c_kv), k_pe], dim=-1)

    def _rotate(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        # DeepSeek rotates interleaved pairs (x0, x1), (x2, x3), ...; laid out as halves instead,
        # the same rotation is ours. Queries and keys get the same layout, so scores are unchanged.
        if self.interleave:
            x = x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)
        return apply_rotary(x, *rope)

    def _decode_sdpa(
        self, q: torch.Tensor, batch: ForwardBatch, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> torch.Tensor:
        """Decode rows q [D, H, rank + rope] over their latent rows, read once: with one shared
        "KV head" the heads become the query rows of each sequence ([D, 1, H, .]), so nothing is
        repeated per head, and the values are the rows' c_kv part, not a second read."""
        rows = self._gather_blocks(k_cache, batch).to(q.dtype)  # [D, 1, ctx, rank + rope]
        o = F.scaled_dot_product_attention(
            q.unsqueeze(1), rows, rows[..., : self.rank], attn_mask=batch.decode_mask, scale=self.scale
        )
        return o.squeeze(1)

    def _up_projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, nope, rank] and W_UV [H, v, rank], views of kv_b_proj's weight."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope + self.v_dim, self.rank)
        return w[:, : self.nope], w[:, self.nope :]
