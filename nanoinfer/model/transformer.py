"""The decoder-only Transformer: one class for every supported architecture, shaped by ModelConfig."""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from nanoinfer.config import ModelConfig
from nanoinfer.errors import ModelLoadError
from nanoinfer.kernels import (
    KV_DTYPES,
    CpuKernels,
    DecodeLayer,
    DecodeMoE,
    DecodeStep,
    Q4Weight,
    kernels,
    kv_half,
    q4_weight,
)
from nanoinfer.model.forward_batch import ForwardBatch, SequenceChunk
from nanoinfer.model.layers import MLP, Attention, RMSNorm
from nanoinfer.model.lora import LoRABatch, MultiLoRALinear
from nanoinfer.model.mla import MLAttention
from nanoinfer.model.moe import SparseMoE
from nanoinfer.model.parallel import PipelineStage, TensorParallel, shard_config, shard_weight
from nanoinfer.model.rope import RotaryEmbedding
from nanoinfer.quant.int4 import Int4Linear

if TYPE_CHECKING:
    from nanoinfer.loading import ModelPackage
    from nanoinfer.model.kv_cache import PagedKVCache

# A layer's fused plan: the kernels, its Int4Linear [qkv, o, gate_up, down] ([qkv, o] for a MoE
# layer) and its MoE description, if any (see DecoderLayer._fused_plan).
FusedPlan = tuple[CpuKernels, list[Int4Linear], DecodeMoE | None]


class DecoderLayer(nn.Module):
    """Pre-norm block: h = x + Attn(Norm(x)); out = h + MLP(Norm(h)), with Gemma's optional post-norms."""

    def __init__(self, config: ModelConfig, layer: int, tp: TensorParallel | None = None):
        super().__init__()
        self.tp = tp  # a rank's shard: the attention and MLP outputs are partial sums
        eps = config.rms_norm_eps
        self.input_norm = RMSNorm(config.hidden_size, eps)
        self.attn: Attention | MLAttention = MLAttention(config, layer) if config.is_mla else Attention(config, layer)
        self.pre_mlp_norm = RMSNorm(config.hidden_size, eps)
        self.mlp: MLP | SparseMoE = SparseMoE(config) if config.is_moe_layer(layer) else MLP(config)
        self.post_attn_norm = RMSNorm(config.hidden_size, eps) if config.post_norms else None
        self.post_mlp_norm = RMSNorm(config.hidden_size, eps) if config.post_norms else None
        self._plan: FusedPlan | None = None  # _fused_plan's answer for _plan_modules
        self._plan_modules: tuple[nn.Module, ...] = ()  # () until first use, so the plan is worked out then

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        batch: ForwardBatch,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        return self._after_attention(x, self.attn(self.input_norm(x), rope, batch, k_cache, v_cache))

    def _after_attention(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Residual add of the attention output h, then the MLP half of the block."""
        if self.tp is not None:
            h = self.tp.all_reduce(h)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = x + h
        h = self.mlp(self.pre_mlp_norm(x))
        if self.tp is not None:
            h = self.tp.all_reduce(h)
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        return x + h

    def forward_dense(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The same block over whole sequences [B, T, D] without a cache (training)."""
        h = self.attn.forward_dense(self.input_norm(x), rope, mask if self.attn.sliding else None)
        return self._after_attention(x, h)

    def _fused_plan(self) -> FusedPlan | None:
        """(kernels, Int4Linear, MoE description) if this layer can run in the C `decode_layer`
        (see Transformer._fused_stack), else None."""
        # Called for every layer every fused step: plain dict lookups, not nn.Module's __getattr__.
        attn, mlp = self._modules["attn"], self._modules["mlp"]
        if not isinstance(attn, Attention):  # the C layer's shape
            return None
        projections = attn._modules
        experts = mlp._modules if isinstance(mlp, MLP) else cast(SparseMoE, mlp).experts[0]._modules
        # (a MoE layer's first expert stands for all: quantization swaps them together)
        modules = cast(
            "tuple[nn.Module, ...]",
            (projections["qkv_proj"], projections["o_proj"], experts["gate_up_proj"], experts["down_proj"]),
        )
        if self._plan_modules != modules:  # first use, or quantized or wrapped for adapters since
            self._plan, self._plan_modules = None, modules
            ours = kernels()
            # Adapter-wrapped projections run fused on their base when no row uses an adapter
            # (Transformer._fused_stack checks the step).
            own = modules if isinstance(mlp, MLP) else modules[:2]
            bases = [m.base if isinstance(m, MultiLoRALinear) else m for m in own]
            linears = [lin for lin in bases if isinstance(lin, Int4Linear) and lin.backend == "c"]
            moe = None if isinstance(mlp, MLP) else cast(SparseMoE, mlp).decode_description()
            fits = isinstance(mlp, MLP) or moe is not None
            if ours is not None and self.post_attn_norm is None and len(linears) == len(own) and fits:
                self._plan = (ours, linears, moe)
        return self._plan

    def _describe(self, plan: FusedPlan, k_cache: torch.Tensor, v_cache: torch.Tensor) -> DecodeLayer:
        a = cast(Attention, self.attn)  # _fused_plan checked it
        qn, kn = a.q_norm, a.k_norm
        _, linears, moe = plan
        qkv, o, *mlp_weights = (q4_weight(lin.packed, lin.out_features, lin.bias) for lin in linears)
        gate_up, down = mlp_weights if moe is None else (Q4Weight(), Q4Weight())
        dense = self.mlp if isinstance(self.mlp, MLP) else None
        return DecodeLayer(
            hidden=self.input_norm.weight.shape[0],
            heads=a.num_heads,
            kv_heads=a.num_kv_heads,
            head_dim=a.head_dim,
            inter=0 if dense is None else dense.intermediate,
            window=a.window,
            gelu=int(self.mlp.gelu),
            eps=self.input_norm.eps,
            scale=a.scale,
            input_norm=self.input_norm.weight.data_ptr(),
            mlp_norm=self.pre_mlp_norm.weight.data_ptr(),
            q_norm=None if qn is None else qn.weight.data_ptr(),
            k_norm=None if kn is None else kn.weight.data_ptr(),
            qkv=qkv,
            o=o,
            gate_up=gate_up,
            down=down,
            k_cache=k_cache.data_ptr(),
            v_cache=v_cache.data_ptr(),
            moe=None if moe is None else ctypes.pointer(moe),
        )


def _same_objects(a: tuple[object, ...], b: tuple[object, ...]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


class Transformer(nn.Module):
    """embed -> N x DecoderLayer -> final norm -> LM head (on the rows that need logits only).

    With `tp`, one tensor-parallel rank's shard: `config` is then the rank's shard config
    (model/parallel.py), and the embedding and head hold the rank's vocabulary rows."""

    def __init__(self, config: ModelConfig, tp: TensorParallel | None = None, stage: PipelineStage | None = None):
        super().__init__()
        c = self.config = config
        self.tp, self.stage = tp, stage
        lo, hi = (0, c.num_layers) if stage is None else stage.layers
        ends = stage is None or stage.first  # the embedding, final norm and head live here
        vocab_rows = c.vocab_size if tp is None else tp.plan.vocab_rows
        self.embed = nn.Embedding(vocab_rows, c.hidden_size) if ends else None
        # Layers of other pipeline stages are placeholders, so ours keep their global names.
        self.layers = nn.ModuleList(
            DecoderLayer(c, i, tp) if lo <= i < hi else nn.Identity() for i in range(c.num_layers)
        )
        # This rank's layers, kept as a list: every step walks them (the layers are never replaced).
        self._decoder_layers = [layer for layer in self.layers if isinstance(layer, DecoderLayer)]
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps) if ends else None
        # An nn.Linear until quantization swaps in another module (see nanoinfer.quant).
        self.lm_head: nn.Module | None = (
            nn.Linear(c.hidden_size, vocab_rows, bias=False) if ends and not c.tie_word_embeddings else None
        )
        self.rope, self.local_rope = self._make_ropes()
        self._stack_key: tuple[object, ...] | None = None  # the cache and plans _fused_stack's table was built for
        self._stack: ctypes.Array[DecodeLayer] | None = None
        # Activations' dtype; weights may be stored narrower (see quant.store_weights_16bit).
        self.activation_dtype = torch.float32
        self.lora_batch: LoRABatch | None = None  # set while adapters are served (adapters.serving)

    def _make_ropes(self) -> tuple[RotaryEmbedding, RotaryEmbedding | None]:
        c = self.config
        rope = RotaryEmbedding(c.rope_dim, c.rope_theta, c.rope_scaling, c.max_position_embeddings)
        # Gemma 3's sliding layers rotate with their own base and no scaling.
        local = None
        if c.rope_local_theta is not None:
            local = RotaryEmbedding(c.head_dim, c.rope_local_theta, None, c.max_position_embeddings)
        return rope, local

    @property
    def decoder_layers(self) -> list[DecoderLayer]:
        """This model's (or pipeline stage's) decoder layers, in order."""
        return self._decoder_layers

    @property
    def dtype(self) -> torch.dtype:
        """The activations' (and KV cache's) dtype."""
        return self.activation_dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @classmethod
    def from_package(
        cls,
        package: ModelPackage,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        tp: TensorParallel | None = None,
        stage: PipelineStage | None = None,
    ) -> Transformer:
        """Build the model described by a loaded package and fill in its weights (with `tp`, the
        rank's shard; with `stage`, that pipeline stage's layers). A package loaded whole is cut
        here; one loaded with the rank's weight filter already holds only its part."""
        config, weights = package.config, package.weights
        if tp is not None:
            if package.weight_filter is None:
                weights = {n: shard_weight(n, w, config, tp.plan) for n, w in weights.items()}
            config = shard_config(config, tp.plan)
        if stage is not None and package.weight_filter is None:
            weights = {n: w for n, w in weights.items() if stage.holds(n)}
        with torch.device("meta"):  # no time spent on random init of weights we overwrite
            model = cls(config, tp, stage)
        model = model.to_empty(device=device)
        model.load_weights(weights, dtype)
        rope, local = model._make_ropes()  # buffers were left empty by to_empty
        model.rope = rope.to(device)
        model.local_rope = local.to(device) if local is not None else None
        for layer in model.decoder_layers:
            if isinstance(layer.mlp, SparseMoE):
                layer.mlp.reset_load()  # another buffer to_empty left uninitialized
        return model.eval()

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv: PagedKVCache) -> torch.Tensor:
        """Run one step; returns float32 logits [rows, vocab] for batch.logits_indices (or every row)."""
        x = self.run_layers(self.embed_tokens(batch.input_ids), batch, kv)
        if batch.logits_indices is not None:
            x = x[batch.logits_indices]
        return self.final_logits(x)

    @torch.inference_mode()
    def final_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final norm and the LM head over the last layer's hidden states."""
        assert self.norm is not None, "the first pipeline stage holds the head"
        return self.compute_logits(self.norm(hidden))

    @torch.inference_mode()
    def run_layers(self, x: torch.Tensor, batch: ForwardBatch, kv: PagedKVCache) -> torch.Tensor:
        """This model's (or stage's) decoder layers over hidden states x; kv holds their caches."""
        rope = self.rope(batch.positions, x.dtype)
        local = self.local_rope(batch.positions, x.dtype) if self.local_rope is not None else rope
        fused = self._fused_stack(x, rope, batch, kv)
        if fused is not None:
            x = fused
        else:
            for i, layer in enumerate(self.decoder_layers):
                x = layer(x, local if layer.attn.sliding else rope, batch, kv.k[i], kv.v[i])
        return x

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The (scaled) embeddings of input_ids in the activations' dtype."""
        assert self.embed is not None, "the first pipeline stage holds the embedding"
        if self.tp is None:
            x = self.embed(input_ids).to(self.activation_dtype)
        else:
            x = self.tp.embed(self.embed.weight, input_ids).to(self.activation_dtype)
        if self.config.embedding_scale != 1.0:
            x = x * torch.tensor(self.config.embedding_scale, dtype=x.dtype)
        return x

    def forward_dense(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, vocab] of whole sequences [B, T] (right-padded), with autograd and no KV
        cache: the training path. Padding sits after every real token, so causal attention
        keeps it out of the real rows."""
        return self.compute_logits(self.hidden_dense(input_ids))

    def hidden_dense(self, input_ids: torch.Tensor) -> torch.Tensor:
        """forward_dense up to the final norm: hidden states [B, T, D] for the LM head."""
        T = input_ids.shape[1]
        x = self.embed_tokens(input_ids)
        positions = torch.arange(T, device=input_ids.device)
        rope = self.rope(positions, x.dtype)
        local = self.local_rope(positions, x.dtype) if self.local_rope is not None else rope
        window = self.config.sliding_window
        mask = None
        if window:
            distance = positions[:, None] - positions[None, :]
            mask = (distance >= 0) & (distance < window)
        for layer in self.decoder_layers:
            x = layer.forward_dense(x, local if layer.attn.sliding else rope, mask)
        assert self.norm is not None, "training runs the whole model"
        return self.norm(x)

    def _fused_stack(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: ForwardBatch, kv: PagedKVCache
    ) -> torch.Tensor | None:
        """Every layer in one C call (`decode_layers`) when each can run fused; None otherwise.

        Only decode rows, float32, one RoPE table, every layer int4 on our kernel without
        post-norms. At batch 1 Python dispatch is a large share of a step (docs/performance.md,
        "Fused decode stack").
        """
        if (
            self.local_rope is not None
            or batch.num_decode != x.shape[0]
            or x.dtype != torch.float32
            or kv.k[0].dtype not in KV_DTYPES
            or not x.is_contiguous()
            or (self.lora_batch is not None and self.lora_batch.active)
            or (self.tp is not None and self.tp.shm_group is None)
        ):
            return None
        maybe_plans = [layer._fused_plan() for layer in self.decoder_layers]  # cached; rechecks the modules
        plans = [plan for plan in maybe_plans if plan is not None]
        if len(plans) != len(maybe_plans):
            return None
        # A plan is rebuilt whenever a layer's modules change (quantized, wrapped for adapters), a
        # cache's tensors are allocated once, and a module moved (`.to`) gets new buffers: the same
        # objects mean the same pointers. The key holds them, so no address is reused while it stands.
        key = (kv, *plans, *(lin._buffers["packed"] for p in plans for lin in p[1]))
        if self._stack is None or self._stack_key is None or not _same_objects(self._stack_key, key):
            layers = [
                layer._describe(p, kv.k[i], kv.v[i]) for i, (layer, p) in enumerate(zip(self.decoder_layers, plans))
            ]
            self._stack, self._stack_key = (DecodeLayer * len(layers))(*layers), key
        # The RoPE tables live until forward returns, as long as this description is used.
        step = DecodeStep(
            rope[0].data_ptr(),
            rope[1].data_ptr(),
            batch.slot_mapping.data_ptr(),
            batch.block_tables.data_ptr(),
            batch.ctx_lens.data_ptr(),
            batch.block_tables.shape[1],
            batch.block_size,
            kv_half(kv.k[0]),
            None if self.tp is None else self.tp.shm_group,
        )
        out = x.clone()
        plans[0][0].decode_layers(self._stack, step, out)
        return out

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # lm_head may be a quantized module (also for a tied head, as a quantized copy of embed)
        if self.lm_head is None:
            assert self.embed is not None, "the first pipeline stage holds the head"
            logits = (hidden @ self.embed.weight.t()).float()
        else:
            logits = self.lm_head(hidden).float()
        if self.tp is not None:
            logits = self.tp.gather_logits(logits)
        cap = self.config.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    @torch.inference_mode()
    def score(self, input_ids: list[int], kv_dtype: torch.dtype | None = None) -> torch.Tensor:
        """Logits [T, vocab] for every position of one sequence, with a throwaway KV cache (in the
        activations' dtype unless `kv_dtype` is given)."""
        from nanoinfer.model.kv_cache import PagedKVCache

        block_size = 16
        num_blocks = (len(input_ids) + block_size - 1) // block_size
        kv = PagedKVCache(self.config, num_blocks, block_size, kv_dtype or self.dtype, self.device)
        chunk = SequenceChunk(list(input_ids), 0, list(range(num_blocks)))
        batch = ForwardBatch.build([chunk], block_size, self.config.sliding_window, self.device, all_logits=True)
        return self.forward(batch, kv)

    # ---- weights -------------------------------------------------------------------------------

    def canonical_weights(self) -> dict[str, torch.Tensor]:
        """The inverse of load_weights: canonical-named float tensors, fused projections split and
        norm offsets taken back out (what a checkpoint of this model holds)."""
        c = self.config
        splits: dict[str, list[tuple[str, int | None]]] = {
            "attn.qkv_proj": [("attn.q_proj", c.q_size), ("attn.k_proj", c.kv_size), ("attn.v_proj", c.kv_size)],
            "gate_up_proj": [("gate_proj", None), ("up_proj", None)],  # halves: dense MLPs and experts alike
        }
        out: dict[str, torch.Tensor] = {}
        for name, param in self.named_parameters():
            tensor = param.detach()
            if name.endswith("norm.weight") and c.norm_weight_offset:
                tensor = tensor - c.norm_weight_offset
            fused = next((f for f in splits if f".{f}." in name), None)
            if fused is None:
                out[name] = tensor
                continue
            start = 0
            for part, size in splits[fused]:
                rows = size or tensor.shape[0] // 2
                out[name.replace(fused, part)] = tensor[start : start + rows]
                start += rows
        return out

    def load_weights(self, weights: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        """Copy canonical-named tensors in, fusing q/k/v and gate/up; norms stay float32."""
        c = self.config
        params = dict(self.named_parameters())

        def put(target: str, tensor: torch.Tensor, rows: slice | None = None) -> None:
            param = params[target]
            dest = param.data if rows is None else param.data[rows]
            if tuple(dest.shape) != tuple(tensor.shape):
                raise ModelLoadError(
                    f"weight {target} has shape {tuple(tensor.shape)}, the config expects {tuple(dest.shape)}"
                )
            dest.copy_(tensor.to(param.dtype))

        self.to(dtype)
        self.activation_dtype = dtype
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.weight.data = module.weight.data.float()
        q, kv = c.q_size, c.kv_size
        fused = {  # None: the gate or up half of gate_up_proj, whatever its width (experts have their own)
            "attn.q_proj": ("attn.qkv_proj", slice(0, q)),
            "attn.k_proj": ("attn.qkv_proj", slice(q, q + kv)),
            "attn.v_proj": ("attn.qkv_proj", slice(q + kv, q + 2 * kv)),
            "gate_proj": ("gate_up_proj", None),
            "up_proj": ("gate_up_proj", None),
        }
        expected = {n: 1 for n in params}
        for fused_name, pieces in (("qkv_proj", 3), ("gate_up_proj", 2)):
            expected.update({n: pieces for n in params if f".{fused_name}." in n})
        loaded: dict[str, int] = {}
        for name, tensor in weights.items():
            target, rows = name, None
            for part, (fused_name, fused_rows) in fused.items():
                if name not in params and f".{part}." in name:
                    target, rows = name.replace(part, fused_name), fused_rows
                    if rows is None:
                        half = tensor.shape[0]
                        rows = slice(0, half) if part == "gate_proj" else slice(half, 2 * half)
            if target not in params:
                if name == "lm_head.weight" and self.lm_head is None:
                    continue  # a tied checkpoint may still carry a copy of the embedding
                raise ModelLoadError(f"unexpected weight {name!r} for a {c.architecture} model")
            if target.endswith("norm.weight") and c.norm_weight_offset:
                tensor = tensor.float() + c.norm_weight_offset
            put(target, tensor, rows)
            loaded[target] = loaded.get(target, 0) + 1
        missing = [n for n, count in expected.items() if loaded.get(n, 0) < count]
        if missing:
            raise ModelLoadError(f"checkpoint lacks {len(missing)} weight(s), e.g. {missing[0]!r}")
