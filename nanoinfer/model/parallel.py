"""Tensor parallelism (Megatron-style): which part of each weight a rank holds.

A rank runs the same Transformer class over a *shard config*: the model's config with the rank's
share of query heads, KV heads and MLP width. So attention, the paged KV cache (the rank's KV
heads only) and the C kernels run unchanged on a shard. Column-parallel projections (q/k/v,
gate/up, each expert's gate/up, MLA's per-head q and kv_b) keep the rank's output rows;
row-parallel ones (o_proj, down_proj) keep its input columns, and their partial outputs are
summed across ranks, once after attention and once after the MLP of each layer. The embedding
and LM head are split by vocabulary rows (padded so every rank holds as many).

Splits need not be even (SmolLM2's 3 KV heads go 2 + 1 over two ranks); what cannot be split at
all, such as more ranks than query heads, is refused with a clear error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from nanoinfer.config import ModelConfig
from nanoinfer.errors import ModelLoadError

if TYPE_CHECKING:
    from nanoinfer.model.comm import Communicator

Span = tuple[int, int]  # [start, end)


def stage_layers(num_layers: int, pipeline_parallel_size: int, stage: int) -> Span:
    """The layers pipeline stage `stage` runs: contiguous, as even as whole layers allow."""
    if num_layers < pipeline_parallel_size:
        raise ModelLoadError(f"cannot split {num_layers} layers into {pipeline_parallel_size} pipeline stages")
    return split_evenly(num_layers, pipeline_parallel_size)[stage]


@dataclass(frozen=True)
class PipelineStage:
    """One pipeline stage: a contiguous run of layers. The first stage also holds the embedding,
    the final norm and the LM head, so hidden states go round the stages and come back to it:
    sampling and a tied head both live where the scheduler does."""

    stage: int
    num_stages: int
    layers: Span

    @classmethod
    def of(cls, config: ModelConfig, stage: int, num_stages: int) -> PipelineStage:
        return cls(stage, num_stages, stage_layers(config.num_layers, num_stages, stage))

    @property
    def first(self) -> bool:
        return self.stage == 0

    def holds(self, name: str) -> bool:
        """Whether canonical weight `name` belongs to this stage."""
        match = _LAYER.match(name)
        if match is None:
            return self.first  # embedding, final norm, LM head
        return self.layers[0] <= int(match.group(1)) < self.layers[1]

    def kv_config(self, config: ModelConfig) -> ModelConfig:
        """The config this stage's KV pool is laid out by: its layers only."""
        lo, hi = self.layers
        return config.replace(num_layers=hi - lo, layer_types=config.layer_types[lo:hi])


_LAYER = re.compile(r"layers\.(\d+)\.")


# MLP width is split in multiples of this where it can be: a row-parallel down_proj's input
# columns then stay whole int4/int8 quantization groups.
WIDTH_UNIT = 32


def split_evenly(total: int, parts: int, unit: int = 1) -> list[Span]:
    """`total` cut into `parts` contiguous spans of whole `unit`s whose sizes differ by at most one unit."""
    units, rest = divmod(total // unit, parts)
    spans: list[Span] = []
    start = 0
    for i in range(parts):
        size = (units + (i < rest)) * unit
        spans.append((start, start + size))
        start += size
    return spans


@dataclass(frozen=True)
class ShardPlan:
    """What rank `rank` of `world` holds: spans of query heads, KV heads, MLP widths and vocabulary rows."""

    rank: int
    world: int
    q_heads: Span
    kv_heads: Span
    intermediate: Span
    moe_intermediate: Span
    vocab: Span  # rows [start, end) of the full vocabulary; end - start is the same on every rank
    vocab_size: int  # the full vocabulary (rows at or past it are padding)

    @property
    def vocab_rows(self) -> int:
        return self.vocab[1] - self.vocab[0]


def plan_shard(config: ModelConfig, rank: int, world: int) -> ShardPlan:
    """This rank's share of `config`, or ModelLoadError naming what cannot be split `world` ways."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} of {world} ranks")
    q_heads, kv_heads = _head_spans(config, rank, world)
    per_rank = -(-config.vocab_size // world)
    return ShardPlan(
        rank=rank,
        world=world,
        q_heads=q_heads,
        kv_heads=kv_heads,
        intermediate=_width_span(config.intermediate_size, rank, world, "intermediate_size"),
        moe_intermediate=_width_span(config.moe_intermediate_size, rank, world, "moe_intermediate_size")
        if config.num_experts
        else (0, 0),
        vocab=(rank * per_rank, (rank + 1) * per_rank),
        vocab_size=config.vocab_size,
    )


def _head_spans(config: ModelConfig, rank: int, world: int) -> tuple[Span, Span]:
    """(query heads, KV heads) of this rank. KV heads are split whole, each with its group of
    query heads; with fewer KV heads than ranks each is replicated on the ranks that split its
    group. MLA has one latent shared by all heads, so its query heads split freely."""
    H, KV = config.num_heads, config.num_kv_heads
    if world > H:
        raise ModelLoadError(f"cannot split {H} attention heads over {world} ranks (tensor_parallel_size > heads)")
    if config.is_mla:
        return split_evenly(H, world)[rank], (0, 1)
    group = H // KV
    if world <= KV:
        kv = split_evenly(KV, world)[rank]
        return (kv[0] * group, kv[1] * group), kv
    if world % KV:
        raise ModelLoadError(
            f"cannot split {KV} KV heads over {world} ranks: with fewer KV heads than ranks, "
            f"tensor_parallel_size must be a multiple of num_kv_heads"
        )
    sharing = world // KV  # ranks that share one KV head, each with part of its query group
    if group < sharing:
        raise ModelLoadError(f"cannot split a group of {group} query heads per KV head over {sharing} ranks")
    head = rank // sharing
    start, end = split_evenly(group, sharing)[rank % sharing]
    return (head * group + start, head * group + end), (head, head + 1)


def _width_span(width: int, rank: int, world: int, field: str) -> Span:
    if width < world:
        raise ModelLoadError(f"cannot split {field} {width} over {world} ranks")
    unit = WIDTH_UNIT if width % WIDTH_UNIT == 0 and width // WIDTH_UNIT >= world else 1
    return split_evenly(width, world, unit)[rank]


def shard_config(config: ModelConfig, plan: ShardPlan) -> ModelConfig:
    """The config a rank's Transformer is built from: its heads and widths; vocab_size stays the
    model's (the tokenizer and sampling read it), the embedding's rows come from the plan."""
    q, kv, inter, moe = plan.q_heads, plan.kv_heads, plan.intermediate, plan.moe_intermediate
    return config.replace(
        num_heads=q[1] - q[0],
        num_kv_heads=kv[1] - kv[0],
        intermediate_size=inter[1] - inter[0],
        moe_intermediate_size=moe[1] - moe[0],
    )


def shard_weight(name: str, tensor: torch.Tensor, config: ModelConfig, plan: ShardPlan) -> torch.Tensor:
    """The part of canonical weight `name` (of the full model `config`) that rank `plan.rank` holds."""
    if name in ("embed.weight", "lm_head.weight"):
        return _vocab_rows(tensor, plan)
    rows, cols = _weight_spans(name, config, plan)
    if name.endswith(("o_proj.bias", "down_proj.bias")):
        return torch.zeros_like(tensor) if plan.rank else tensor  # a row-parallel bias is added once
    if rows is None and cols is None:
        return tensor
    if rows is not None:
        tensor = tensor[rows[0] : rows[1]]
    if cols is not None:
        tensor = tensor[:, cols[0] : cols[1]]
    return tensor.contiguous()


def _vocab_rows(tensor: torch.Tensor, plan: ShardPlan) -> torch.Tensor:
    start, end = plan.vocab
    part = tensor[start : min(end, plan.vocab_size)]
    if part.shape[0] == plan.vocab_rows:
        return part.contiguous()
    padded = torch.zeros((plan.vocab_rows, *tensor.shape[1:]), dtype=tensor.dtype)
    padded[: part.shape[0]] = part
    return padded


def _weight_spans(name: str, config: ModelConfig, plan: ShardPlan) -> tuple[Span | None, Span | None]:
    """(rows, columns) of `name` this rank keeps; None: all of them."""
    c = config
    head_dim = c.head_dim
    q, kv = plan.q_heads, plan.kv_heads
    if c.is_mla:
        per_head = {
            "attn.q_proj.weight": c.qk_nope_head_dim + c.qk_rope_head_dim,
            "attn.q_b_proj.weight": c.qk_nope_head_dim + c.qk_rope_head_dim,
            "attn.kv_b_proj.weight": c.qk_nope_head_dim + c.v_head_dim,
        }
        for suffix, rows in per_head.items():
            if name.endswith(suffix):
                return (q[0] * rows, q[1] * rows), None
        if name.endswith("attn.o_proj.weight"):
            return None, (q[0] * c.v_head_dim, q[1] * c.v_head_dim)
        if ".attn." in name:
            return None, None  # q_a / kv_a projections and norms: the latent is shared
    else:
        if name.endswith(("attn.q_proj.weight", "attn.q_proj.bias")):
            return (q[0] * head_dim, q[1] * head_dim), None
        if name.endswith(("attn.k_proj.weight", "attn.k_proj.bias", "attn.v_proj.weight", "attn.v_proj.bias")):
            return (kv[0] * head_dim, kv[1] * head_dim), None
        if name.endswith("attn.o_proj.weight"):
            return None, (q[0] * head_dim, q[1] * head_dim)
    width: Span = plan.intermediate
    if ".mlp.experts." in name:
        width = plan.moe_intermediate
    elif ".mlp.shared_experts." in name:
        width = (plan.moe_intermediate[0] * c.num_shared_experts, plan.moe_intermediate[1] * c.num_shared_experts)
    if name.endswith(("gate_proj.weight", "up_proj.weight")):
        return width, None
    if name.endswith("down_proj.weight"):
        return None, width
    return None, None


def shard_shapes(
    shapes: dict[str, tuple[int, ...]], config: ModelConfig, plan: ShardPlan
) -> dict[str, tuple[int, ...]]:
    """The shapes of the weights rank `plan.rank` holds, from the full model's (no data needed)."""
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        if name in ("embed.weight", "lm_head.weight"):
            out[name] = (plan.vocab_rows, *shape[1:])
            continue
        rows, cols = _weight_spans(name, config, plan)
        dims = list(shape)
        if rows is not None:
            dims[0] = rows[1] - rows[0]
        if cols is not None:
            dims[1] = cols[1] - cols[0]
        out[name] = tuple(dims)
    return out


@dataclass
class TensorParallel:
    """A rank's place in its tensor-parallel group, as the model sees it. `comm` is set once the
    group is connected, before the first forward."""

    plan: ShardPlan
    comm: Communicator | None

    @property
    def shm_group(self) -> Any:
        """The C kernels' pointer to the shared-memory group, or None when the exchange is torch.distributed's."""
        return getattr(self.comm, "group_pointer", None)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of a row-parallel layer's partial output."""
        assert self.comm is not None
        return self.comm.all_reduce(x.float().contiguous() if x.dtype != torch.float32 else x.contiguous())

    def embed(self, embedding: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Rows of the full embedding for `ids`, from every rank's vocabulary rows."""
        start, end = self.plan.vocab
        mine = (ids >= start) & (ids < end)
        x = torch.nn.functional.embedding((ids - start) * mine, embedding) * mine.unsqueeze(-1).to(embedding.dtype)
        return self.all_reduce(x)

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Every rank's vocabulary columns side by side, cut to the real vocabulary."""
        assert self.comm is not None
        whole = self.comm.all_gather(logits.float().contiguous())  # [world, ..., vocab_rows]
        return whole.movedim(0, -2).reshape(*logits.shape[:-1], -1)[..., : self.plan.vocab_size]
