"""Mixture of experts: a router scores every expert for each token, the top k run, and their
outputs are summed with the router's weights. Compute is sparse (k experts a token), storage
dense (every expert's weights are resident).

Tokens are grouped by expert (one sort of the token -> expert assignments), then each expert
that received any runs its gated MLP once over its group, and the weighted results are added
back to their tokens. Experts are ordinary `MLP` modules, so weight-only quantization and the
C gated-activation kernel apply to them as to a dense layer.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import nn

from nanoinfer.config import ModelConfig
from nanoinfer.kernels import CpuKernels, DecodeMoE, Q4Weight, kernels, q4_weight
from nanoinfer.model.layers import MLP
from nanoinfer.quant.int4 import Int4Linear

# What the one-call C path needs of a layer: kernels and every expert's gate_up and down weights.
ExpertTables = tuple[CpuKernels, ctypes.Array[Q4Weight], ctypes.Array[Q4Weight]]


class Router(nn.Module):
    """Token -> (weights [T, k], expert ids [T, k]). Scored in float32 whatever the activations,
    as the reference implementations do, so near-ties pick the same experts.

    - scores: softmax over the experts (Qwen3-MoE, Mixtral, DeepSeek-V2) or each expert's
      sigmoid (DeepSeek-V3);
    - choice: the top k scores, after DeepSeek-V3's learned per-expert correction bias, among
      the `router_topk_groups` best of `router_groups` expert groups only (a group scores its
      best expert, or its best two summed);
    - weights: the chosen experts' scores (without the bias), renormalized to sum to one where
      the config says so, times `routed_scaling_factor`.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # A bare parameter, not an nn.Linear, so quantization leaves the router alone.
        self.weight = nn.Parameter(torch.zeros(config.num_experts, config.hidden_size))
        self.top_k = config.num_experts_per_tok
        self.renormalize = config.norm_topk_prob
        self.sigmoid = config.router_scoring == "sigmoid"
        self.groups, self.topk_groups = config.router_groups, config.router_topk_groups
        self.group_score_top2 = config.router_group_score == "top2"
        self.scaling = config.routed_scaling_factor
        # Learned by load balancing, not by gradients: frozen in fine-tuning too.
        bias = torch.zeros(config.num_experts) if config.router_correction_bias else None
        self.correction_bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.sigmoid else logits.softmax(dim=-1)
        choice = scores if self.correction_bias is None else scores + self.correction_bias.float()
        if self.groups > 1:
            choice = self._best_groups_only(choice)
        ids = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if self.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return (weights * self.scaling if self.scaling != 1.0 else weights), ids

    def _best_groups_only(self, choice: torch.Tensor) -> torch.Tensor:
        """`choice` with every expert outside each token's `topk_groups` best groups at -inf."""
        grouped = choice.view(choice.shape[0], self.groups, -1)
        score = grouped.topk(2, dim=-1).values.sum(-1) if self.group_score_top2 else grouped.amax(-1)
        best = score.topk(self.topk_groups, dim=-1).indices
        keep = torch.zeros_like(score, dtype=torch.bool).scatter_(1, best, True)
        return grouped.masked_fill(~keep[..., None], float("-inf")).view_as(choice)


class SparseMoE(nn.Module):
    """The MLP of a mixture-of-experts layer; counts the tokens each expert receives."""

    expert_tokens: torch.Tensor  # buffer [experts]: tokens routed to each expert since the last reset

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.router = Router(config)
        expert = config.replace(intermediate_size=config.moe_intermediate_size)
        self.experts = nn.ModuleList(MLP(expert) for _ in range(config.num_experts))
        # DeepSeek's shared experts: one MLP every token goes through, as wide as all of them.
        shared = config.replace(intermediate_size=config.moe_intermediate_size * config.num_shared_experts)
        self.shared_experts = MLP(shared) if config.num_shared_experts else None
        self.register_buffer("expert_tokens", torch.zeros(config.num_experts, dtype=torch.long), persistent=False)
        self.expert_width = config.moe_intermediate_size
        self.gelu = config.activation == "gelu_tanh"
        self._tables: ExpertTables | None = None  # the C path's weight tables (see _c_tables)
        self._tables_probe: tuple[object, ...] = ()
        self._packed: list[torch.Tensor] = []  # what the tables point into

    def _one_token(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Decode at batch 1: no grouping to do, so half the tensor ops (docs/performance.md,
        "Mixture of experts")."""
        if not torch.is_grad_enabled():
            self.expert_tokens.index_add_(0, ids, torch.ones_like(ids))
        out: torch.Tensor | None = None
        for weight, expert in zip(weights.tolist(), ids.tolist()):
            y = self.experts[expert](x)
            out = y.mul_(weight) if out is None else out.add_(y, alpha=weight)
        assert out is not None
        return out

    def _c_tables(self, x: torch.Tensor) -> ExpertTables | None:
        """The C path's tables when it applies (float32 CPU inference, every expert int4 on our
        kernels, no bias). Worked out on first use and again when the first expert's modules are
        swapped (quantization replaces them all); checking all 2 x experts modules every call
        cost more than the call itself. The tables keep the packed weights alive, so a pointer
        in them never outlives its tensor."""
        if x.dtype != torch.float32 or x.device.type != "cpu" or torch.is_grad_enabled():
            return None
        first = self.experts[0]
        probe = (first.gate_up_proj, first.down_proj)
        if self._tables_probe != probe:
            self._tables, self._tables_probe = self._build_tables(), probe
        return self._tables

    def _build_tables(self) -> ExpertTables | None:
        modules = [m for e in self.experts for m in (e.gate_up_proj, e.down_proj)]
        linears = [m for m in modules if isinstance(m, Int4Linear) and m.backend == "c" and not m.exact_fp32]
        ours = kernels()
        if ours is None or len(linears) != len(modules) or any(m.bias is not None for m in linears):
            return None
        self._packed = [m.packed for m in linears]
        tables = [q4_weight(m.packed, m.out_features, None) for m in linears]
        gate_up = (Q4Weight * len(self.experts))(*tables[0::2])
        down = (Q4Weight * len(self.experts))(*tables[1::2])
        return ours, gate_up, down

    def decode_description(self) -> DecodeMoE | None:
        """This layer for the C fused decode stack, or None where that cannot run it: it does
        softmax routing over int4 experts on our kernels, without groups, a correction bias or
        shared experts (the others run the Python path). Built from the expert tables, which
        it keeps alive; the router's weight and the load counts are read in place."""
        r = self.router
        plain = not r.sigmoid and r.groups == 1 and r.correction_bias is None and self.shared_experts is None
        if not plain or r.weight.dtype != torch.float32 or r.weight.device.type != "cpu":
            return None
        first = self.experts[0]
        probe = (first.gate_up_proj, first.down_proj)
        if self._tables_probe != probe:
            self._tables, self._tables_probe = self._build_tables(), probe
        if self._tables is None:
            return None
        _, gate_up, down = self._tables
        return DecodeMoE(
            experts=len(self.experts),
            top_k=r.top_k,
            renormalize=int(r.renormalize),
            inter=self.expert_width,
            scaling=r.scaling,
            router=r.weight.data_ptr(),
            gate_up=gate_up,
            down=down,
            load=self.expert_tokens.data_ptr(),
        )

    def reset_load(self) -> None:
        self.expert_tokens.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, ids = self.router(flat)
        tables = self._c_tables(flat)
        if flat.shape[0] == 1 and tables is None:
            out = self._one_token(flat, weights[0], ids[0])
        else:
            out = self._grouped(flat, weights, ids, tables)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.reshape(x.shape)

    def _grouped(
        self, flat: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, tables: ExpertTables | None
    ) -> torch.Tensor:
        """Tokens grouped by expert, each expert once over its group (one C call for all of them
        given `tables`), the results added back."""
        choices = ids.flatten()  # [T * k]: token t's j-th expert at t * k + j
        order = choices.argsort(stable=True)  # the choices grouped by expert
        counts = torch.bincount(choices, minlength=len(self.experts))
        if not torch.is_grad_enabled():  # inference: the load statistics (metrics, inspect)
            self.expert_tokens += counts
        rows = order // self.router.top_k  # the token of each grouped choice
        grouped = flat.index_select(0, rows)
        if tables is not None:  # every expert int4 on our kernels: one C call for all of them
            ours, gate_up, down = tables
            outputs = ours.moe_experts(gate_up, down, counts, grouped, self.expert_width, self.gelu)
        else:
            outputs = torch.empty_like(grouped)
            start = 0
            for expert, n in enumerate(counts.tolist()):
                if n:
                    outputs[start : start + n] = self.experts[expert](grouped[start : start + n])
                    start += n
        outputs = outputs * weights.flatten()[order, None].to(outputs.dtype)
        return torch.zeros_like(flat).index_add_(0, rows, outputs)
