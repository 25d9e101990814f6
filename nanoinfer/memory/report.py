"""The plan as text, the way `nanoinfer memory` prints it."""

from __future__ import annotations

from typing import Any

from nanoinfer.memory.activations import thousands
from nanoinfer.memory.plan import Fit, MemoryPlan, RankPlan
from nanoinfer.memory.pool import DEFAULT_KV_CAP_BYTES
from nanoinfer.memory.weights import dtype_name

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
        f"{c.num_layers} layers, hidden {thousands(c.hidden_size)}, {heads}, vocabulary {thousands(c.vocab_size)},"
        f" context {thousands(c.max_position_embeddings)}"
    )
    if c.num_experts:
        shape += f", {c.num_experts} experts (top {c.num_experts_per_tok})"
    quant = rt.quantization + (" (the model's default)" if e.quantization is None else "")
    length = f"{thousands(plan.max_model_len)}" + ("" if e.max_model_len else " (the model's)")
    lines = [
        f"{plan.meta.name}: {c.architecture}, from the {plan.meta.kind} of {plan.meta.source}",
        f"  {shape}",
        f"  dtype {e.dtype} (weights {dtype_name(rt.weights)}, activations {dtype_name(rt.activations)}),"
        f" quantization {quant}, KV cache {dtype_name(rt.kv)} ({e.kv_cache_dtype}),"
        f" device {rt.device}{' with the C kernels' if rt.c_kernels else ''}",
        f"  max_model_len {length}, max_num_seqs {e.max_num_seqs},"
        f" max_num_batched_tokens {thousands(e.max_num_batched_tokens)}, block_size {e.block_size},"
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
        lines += [_line(f"      {what}: {thousands(p)} values", b) for what, (p, b) in fmt.parts.items()]
    lines.append(f"  KV cache per token = {r.kv_formula}")
    if e.kv_cache_memory is not None:
        asked = f"--kv-cache-memory {format_bytes(e.kv_cache_memory)}"
    else:
        asked = f"{thousands(plan.max_model_len)} tokens × {e.max_num_seqs} sequences"
        if (
            e.max_model_len is None
            and r.kv_bytes_per_token * plan.max_model_len * e.max_num_seqs > DEFAULT_KV_CAP_BYTES
        ):
            asked += f", capped at {format_bytes(DEFAULT_KV_CAP_BYTES)} without --max-model-len"
    blocks = f"{thousands(r.kv_blocks)} blocks of {e.block_size} = {thousands(r.kv_blocks * e.block_size)} tokens"
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
        f"  the KV cache has room for {thousands(fit.kv_tokens)} tokens",
    ]
    if fit.max_num_seqs is None:
        lines.append(f"  at max_model_len {thousands(L)}: not even one sequence fits")
    else:
        lines.append(f"  at max_model_len {thousands(L)}: max_num_seqs up to {thousands(fit.max_num_seqs)}")
    if fit.max_model_len is None:
        lines.append(f"  at max_num_seqs {B}: not even one block fits")
    else:
        whole = " (the model's whole window)" if fit.max_model_len == window else ""
        lines.append(f"  at max_num_seqs {B}: max_model_len up to {thousands(fit.max_model_len)}{whole}")
    return lines
