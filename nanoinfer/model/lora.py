"""LoRA: a frozen linear plus a trainable low-rank update, y = W x + (alpha / r) * B (A x).

Our projections are fused (q, k and v in one `qkv_proj`; gate and up in one `gate_up_proj`), so
one LoRALinear carries an update per target (e.g. q_proj and v_proj), each writing its own
slice of the fused output. PEFT's names for the targets are kept, so adapters move between
PEFT and nanoinfer unchanged (`loading/peft_adapter.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import nn

from nanoinfer.config import ModelConfig

if TYPE_CHECKING:
    from nanoinfer.model.transformer import Transformer

# PEFT's target name -> (our module under a decoder layer, which rows of its output).
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def target_rows(config: ModelConfig, target: str) -> tuple[str, slice]:
    """Where a PEFT target lives in our model: module path under a layer and its output rows."""
    q, kv, inter, hidden = config.q_size, config.kv_size, config.intermediate_size, config.hidden_size
    places = {
        "q_proj": ("attn.qkv_proj", slice(0, q)),
        "k_proj": ("attn.qkv_proj", slice(q, q + kv)),
        "v_proj": ("attn.qkv_proj", slice(q + kv, q + 2 * kv)),
        "o_proj": ("attn.o_proj", slice(0, hidden)),
        "gate_proj": ("mlp.gate_up_proj", slice(0, inter)),
        "up_proj": ("mlp.gate_up_proj", slice(inter, 2 * inter)),
        "down_proj": ("mlp.down_proj", slice(0, hidden)),
    }
    if target not in places:
        raise ValueError(f"unknown LoRA target {target!r}; choose from {', '.join(TARGETS)}")
    if config.is_mla and places[target][0] == "attn.qkv_proj":
        raise ValueError(
            f"LoRA target {target!r}: this {config.architecture} model's attention is multi-head latent "
            "attention, whose projections are not q/k/v_proj (o_proj can take an adapter)"
        )
    if config.num_experts and places[target][0].startswith("mlp."):
        raise ValueError(
            f"LoRA target {target!r} is in the MLP, which is a mixture of experts in this "
            f"{config.architecture} model; LoRA on experts is not supported (target q/k/v/o_proj)"
        )
    return places[target]


@dataclass(frozen=True)
class LoRASpec:
    """The shape of an adapter: rank, scaling and where it applies."""

    r: int
    alpha: float
    targets: tuple[str, ...]
    dropout: float = 0.0
    use_rslora: bool = False  # scaling alpha / sqrt(r) instead of alpha / r

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {self.r}")
        if not self.targets:
            raise ValueError("LoRA needs at least one target module")
        for t in self.targets:
            if t not in TARGETS:
                raise ValueError(f"unknown LoRA target {t!r}; choose from {', '.join(TARGETS)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoRALinear(nn.Module):
    """A frozen base linear and, per target, A [r, in] and B [rows, r] updating those output rows."""

    def __init__(self, base: nn.Module, rows: dict[str, slice], spec: LoRASpec) -> None:
        super().__init__()
        weight = cast(torch.Tensor, base.weight)
        self.base = base
        self.rows = rows
        self.scaling = spec.scaling
        self.dropout = spec.dropout
        in_features = weight.shape[1]
        self.lora_A = nn.ParameterDict(
            {t: nn.Parameter(torch.empty(spec.r, in_features, dtype=torch.float32, device=weight.device)) for t in rows}
        )
        self.lora_B = nn.ParameterDict(
            {
                t: nn.Parameter(torch.zeros(s.stop - s.start, spec.r, dtype=torch.float32, device=weight.device))
                for t, s in rows.items()
            }
        )
        for a in self.lora_A.values():  # PEFT's initialisation: B = 0, so training starts at the base model
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    @property
    def weight(self) -> torch.Tensor:
        return cast(torch.Tensor, self.base.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        h = F.dropout(x, self.dropout, self.training) if self.dropout else x
        a = torch.cat(list(self.lora_A.values())) if len(self.rows) > 1 else next(iter(self.lora_A.values()))
        # One update over every output column: slicing each target's rows of `out` would cost a
        # zero-filled copy of it per target in the backward pass; these zeros are r columns wide.
        delta = (h.to(a.dtype) @ a.t()) @ self._stacked_b().t()
        return out.add_(delta.to(out.dtype), alpha=self.scaling)  # base's backward keeps x, not out

    def _stacked_b(self) -> torch.Tensor:
        """Every target's B in one [out, targets * r] matrix: B_t on its rows and its r columns."""
        out_features, width = self.weight.shape[0], len(self.rows) * next(iter(self.lora_B.values())).shape[1]
        pieces = []
        for i, (target, rows) in enumerate(self.rows.items()):
            b = self.lora_B[target]
            r = b.shape[1]
            pieces.append(F.pad(b, (i * r, width - (i + 1) * r, rows.start, out_features - rows.stop)))
        return pieces[0] if len(pieces) == 1 else torch.stack(pieces).sum(0)

    def merged_weight(self) -> torch.Tensor:
        """The base weight with every update folded in: W + scaling * B @ A on each target's rows."""
        weight = self.weight.detach().float().clone()
        for target, rows in self.rows.items():
            weight[rows] += self.scaling * (self.lora_B[target] @ self.lora_A[target]).detach()
        return weight


def apply_lora(model: Transformer, config: ModelConfig, spec: LoRASpec) -> dict[str, LoRALinear]:
    """Wrap every targeted projection of every layer in a LoRALinear; returns them by module path."""
    by_module: dict[str, dict[str, slice]] = {}
    for target in spec.targets:
        module, rows = target_rows(config, target)
        by_module.setdefault(module, {})[target] = rows
    wrapped: dict[str, LoRALinear] = {}
    for i, layer in enumerate(model.decoder_layers):
        for path, targets in by_module.items():
            parent_path, name = path.rsplit(".", 1)
            parent = layer.get_submodule(parent_path)
            lora = LoRALinear(getattr(parent, name), targets, spec)
            setattr(parent, name, lora)
            wrapped[f"layers.{i}.{path}"] = lora
    return wrapped


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRALinear into its base weight and put the plain base module back."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            module.weight.data.copy_(module.merged_weight().to(module.weight.dtype))
            parent_path, attr = name.rsplit(".", 1)
            setattr(model.get_submodule(parent_path), attr, module.base)


# ---- serving many adapters at once ------------------------------------------------------------


# A chunk of at least this many rows (a prefill) runs through its own adapter alone; shorter
# chunks (decode rows) share the masked product, whose cost grows with every resident slot.
SEGMENT_ROWS = 16


class LoRABatch:
    """Which adapter each row of the current step uses, shared by every MultiLoRALinear.

    Adapters live in `max_slots` slots (slot 0 means none). Long chunks (prefills) are
    `segments`: their rows go through their own adapter's A and B only. The other rows take a
    mask: their slot's scaling on that slot's `max_rank` columns and zero elsewhere, so one dense
    product per module gives every such row its own adapter's update (a dense form of Punica's
    gathered LoRA, cheap for the few rows of decode steps), rows of different adapters in one
    forward pass.
    """

    def __init__(self, max_slots: int, max_rank: int, device: torch.device | str = "cpu") -> None:
        self.max_slots = max_slots
        self.max_rank = max_rank
        self.scaling = torch.zeros(max_slots + 1, device=device)  # per slot; slot 0 stays 0
        self.mask: torch.Tensor | None = None  # [masked rows, max_slots * max_rank]; None: no such row
        self.masked_rows: torch.Tensor | None = None  # the masked rows' indices; None: every row
        self.segments: list[tuple[int, int, int, float]] = []  # (first row, end row, slot, scaling)
        self._tiled: dict[int, torch.Tensor] = {}

    @property
    def active(self) -> bool:
        """Whether any row of this step uses an adapter."""
        return self.mask is not None or bool(self.segments)

    def set_rows(self, chunks: list[tuple[int, int]]) -> None:
        """The step's (slot, rows) per chunk in batch order (slot 0: the base model)."""
        self._tiled, self.mask, self.masked_rows, self.segments = {}, None, None, []
        if not any(slot for slot, _ in chunks):  # base-model traffic: nothing to lay out per row
            return
        masked_slots: list[int] = []
        masked_rows: list[int] = []
        row = 0
        for slot, n in chunks:
            if slot and n >= SEGMENT_ROWS:
                self.segments.append((row, row + n, slot, float(self.scaling[slot])))
            else:
                masked_slots += [slot] * n
                masked_rows += range(row, row + n)
            row += n
        if not any(masked_slots):
            return
        device = self.scaling.device
        per_slot = F.one_hot(torch.tensor(masked_slots, device=device), self.max_slots + 1).to(self.scaling.dtype)
        self.mask = (per_slot * self.scaling)[:, 1:].repeat_interleave(self.max_rank, dim=1)
        if len(masked_rows) != row:
            self.masked_rows = torch.tensor(masked_rows, device=device)

    def tiled(self, num_targets: int) -> torch.Tensor:
        """The mask repeated for a module carrying `num_targets` targets side by side."""
        assert self.mask is not None
        if num_targets not in self._tiled:
            self._tiled[num_targets] = self.mask.repeat(1, num_targets)
        return self._tiled[num_targets]


class MultiLoRALinear(nn.Module):
    """A base projection plus every resident adapter's update, each row taking its own.

    A holds, for each target and slot, that adapter's A (rank padded to max_rank with zero rows);
    B holds its B transposed, placed at the target's output columns. Masked rows take
    delta = ((x @ A.T) * mask) @ B: two matmuls per module whatever the mix of adapters; a
    segment takes its own slot's blocks of A and B, target by target.
    """

    lora_a: torch.Tensor  # buffers: [targets * slots * rank, in], [targets * slots * rank, out]
    lora_b: torch.Tensor

    def __init__(self, base: nn.Module, rows: dict[str, slice], batch: LoRABatch) -> None:
        super().__init__()
        self.base = base
        self.batch = batch
        self.rows = dict(sorted(rows.items(), key=lambda kv: kv[1].start))
        size = len(self.rows) * batch.max_slots * batch.max_rank
        in_features, out_features = int(base.in_features), int(base.out_features)  # type: ignore[arg-type]
        device = batch.scaling.device
        self.register_buffer("lora_a", torch.zeros(size, in_features, device=device), persistent=False)
        self.register_buffer("lora_b", torch.zeros(size, out_features, device=device), persistent=False)

    def _block(self, target: str, slot: int) -> slice:
        t = list(self.rows).index(target)
        start = (t * self.batch.max_slots + slot - 1) * self.batch.max_rank
        return slice(start, start + self.batch.max_rank)

    def load(self, slot: int, target: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Put one target's A [r, in] and B [rows, r] into `slot` (1-based)."""
        block, r = self._block(target, slot), a.shape[0]
        self.lora_a[block] = 0
        self.lora_b[block] = 0
        self.lora_a[block.start : block.start + r] = a.to(self.lora_a)
        self.lora_b[block.start : block.start + r, self.rows[target]] = b.t().to(self.lora_b)

    def clear(self, slot: int) -> None:
        for target in self.rows:
            block = self._block(target, slot)
            self.lora_a[block] = 0
            self.lora_b[block] = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        batch = self.batch
        if batch.mask is not None:
            rows = batch.masked_rows
            xs = x if rows is None else x.index_select(0, rows)
            h = (xs.to(self.lora_a.dtype) @ self.lora_a.t()).mul_(batch.tiled(len(self.rows)))
            if rows is None and out.dtype == h.dtype:  # in place: these small products run every step
                out.addmm_(h, self.lora_b)
            elif rows is None:
                out += (h @ self.lora_b).to(out.dtype)
            else:
                out.index_add_(0, rows, (h @ self.lora_b).to(out.dtype))
        for start, end, slot, scaling in batch.segments:
            xs = x[start:end].to(self.lora_a.dtype)
            for target, cols in self.rows.items():
                block = self._block(target, slot)
                delta = (xs @ self.lora_a[block].t()) @ self.lora_b[block, cols]
                out[start:end, cols] += (delta * scaling).to(out.dtype)
        return out
