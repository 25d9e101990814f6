"""Load a llama.cpp GGUF file: metadata -> ModelConfig, dequantized tensors -> canonical weights."""

from __future__ import annotations

import logging
import math
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanoinfer.config import GenerationDefaults, ModelConfig, mla_attention_scale
from nanoinfer.errors import ModelLoadError
from nanoinfer.loading.gguf_reader import GGUFFile, GGUFFormatError
from nanoinfer.loading.gguf_tokenizer import tokenizer_from_gguf_metadata
from nanoinfer.loading.package import ModelPackage, WeightFilter, expected_shapes, fused_parts
from nanoinfer.tokenizer import Tokenizer

log = logging.getLogger(__name__)

GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "qwen3moe", "phi3", "deepseek2")

# llama.cpp's architecture names where ours differ (llama with experts becomes mixtral: _moe_fields)
_ARCHITECTURE_NAMES = {"qwen3moe": "qwen3_moe"}

# GGUF tensor name (inside blk.N) -> canonical name (inside layers.N)
_LAYER_NAMES = {
    "attn_norm": "input_norm",
    "attn_q": "attn.q_proj",
    "attn_k": "attn.k_proj",
    "attn_v": "attn.v_proj",
    "attn_output": "attn.o_proj",
    "attn_q_norm": "attn.q_norm",
    "attn_k_norm": "attn.k_norm",
    "post_attention_norm": "post_attn_norm",
    "ffn_norm": "pre_mlp_norm",
    "post_ffw_norm": "post_mlp_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.router",
    # DeepSeek: multi-head latent attention, shared experts, the router's correction bias
    "attn_q_a": "attn.q_a_proj",
    "attn_q_a_norm": "attn.q_a_norm",
    "attn_q_b": "attn.q_b_proj",
    "attn_kv_a_mqa": "attn.kv_a_proj",
    "attn_kv_a_norm": "attn.kv_a_norm",
    "attn_kv_b": "attn.kv_b_proj",
    "ffn_gate_shexp": "mlp.shared_experts.gate_proj",
    "ffn_up_shexp": "mlp.shared_experts.up_proj",
    "ffn_down_shexp": "mlp.shared_experts.down_proj",
}
# Newer converters store DeepSeek's kv_b_proj as its two halves, per head: k_b [H, rank, nope]
# (transposed) and v_b [H, v, rank]; they are put back together on load.
_SPLIT_KV_B = re.compile(r"^blk\.(\d+)\.attn_(k_b|v_b)\.weight$")
# _BLOCK's tensors whose canonical name does not end in .weight / .bias as GGUF's does
_RENAMED = {"exp_probs_b.bias": "mlp.router.correction_bias"}
# Experts stacked in one 3-D tensor [experts, out, in]: split into mlp.experts.N.<projection>.
_EXPERT_NAMES = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
_GLOBAL_NAMES = {"token_embd": "embed", "output_norm": "norm", "output": "lm_head"}
# llama 3 precomputed rope factors (see config notes); Phi-3's LongRoPE factors, read into the config
_IGNORED = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}
# Phi-3 keeps q/k/v in one attn_qkv and gate/up in one ffn_up (2 x feed_forward_length rows)
_FUSED = {"attn_qkv": "qkv", "ffn_up": "gate_up"}
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def load_gguf(path: str | Path, weight_filter: WeightFilter | None = None) -> ModelPackage:
    """Read a GGUF file into a ModelPackage (float32 weights in HF layout)."""
    path = Path(path)
    gf = open_gguf(path)
    try:
        meta = gf.metadata
        arch = meta.get("general.architecture")
        if arch not in GGUF_ARCHITECTURES:
            raise ModelLoadError(
                f"{path.name}: GGUF architecture {arch!r} is not supported; supported: {', '.join(GGUF_ARCHITECTURES)}"
            )
        shapes = {name: info.shape for name, info in gf.tensors.items()}
        config = config_from_metadata(meta, shapes)
        if "rope_factors_long.weight" in shapes:
            config = config.replace(rope_scaling=_longrope_scaling(gf, meta, config))
        # Check shapes before the (slow) dequantization so a mismatched file fails fast.
        check_shapes(config, _canonical_shapes(shapes, config), path.name)
        tokenizer = tokenizer_from_gguf_metadata(meta, arch)
        weights = _load_weights(gf, config, path, weight_filter)
    finally:
        gf.close()
    generation = GenerationDefaults(
        temperature=meta.get("general.sampling.temp"),
        top_p=meta.get("general.sampling.top_p"),
        top_k=meta.get("general.sampling.top_k"),
        repetition_penalty=meta.get("general.sampling.penalty_repeat"),
        eos_token_ids=tokenizer.eos_token_ids,
        bos_token_id=tokenizer.bos_token_id,
    )
    return ModelPackage(
        config=config,
        weights=weights,
        tokenizer=tokenizer,
        generation=generation,
        source=str(path),
        file_type=_file_type(meta, gf),
        weight_filter=weight_filter,
    )


def load_gguf_tokenizer(path: str | Path) -> Tokenizer:
    """Only the tokenizer of a GGUF file (no tensors are decoded)."""
    gf = open_gguf(path)
    try:
        return tokenizer_from_gguf_metadata(gf.metadata, str(gf.metadata.get("general.architecture", "")))
    finally:
        gf.close()


def open_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file's header; any malformation becomes a one-line ModelLoadError."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist")
    try:
        return GGUFFile(path)
    except GGUFFormatError as e:
        raise ModelLoadError(f"{path} is not a valid GGUF file: {e}") from None
    except (OSError, ValueError, UnicodeDecodeError, struct.error) as e:
        raise ModelLoadError(f"{path} is not a valid GGUF file (truncated or corrupt?): {_one_line(e)}") from None


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def _f32(x: Any) -> float:
    # GGUF stores floats as float32; 1e-6 comes back as 9.99999997e-07. Round to float32 precision.
    return float(f"{float(x):.7g}")


def config_from_metadata(meta: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> ModelConfig:
    """ModelConfig from GGUF metadata; `shapes` (tensor name -> HF-order shape) fills the gaps."""
    arch = meta["general.architecture"]

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    try:
        hidden = int(get("embedding_length"))
        num_layers = int(get("block_count"))
        heads = _scalar_per_layer(get("attention.head_count"), "attention.head_count")
        kv_heads = _scalar_per_layer(get("attention.head_count_kv", heads), "attention.head_count_kv")
        intermediate = _scalar_per_layer(get("feed_forward_length"), "feed_forward_length")
    except (TypeError, ValueError):
        raise ModelLoadError(
            f"GGUF metadata lacks the {arch} dimensions (embedding_length, block_count, ...)"
        ) from None
    head_dim = int(get("attention.key_length") or hidden // heads)
    rot = get("rope.dimension_count")
    if rot is not None and int(rot) != head_dim and arch != "deepseek2":  # MLA's rope part: _deepseek2_fields
        raise ModelLoadError(f"partial rotary embeddings ({rot} of {head_dim} dims) are not supported")
    if "token_embd.weight" not in shapes:
        raise ModelLoadError("GGUF file has no token_embd.weight tensor")
    if "rope_freqs.weight" in shapes:
        log.warning("GGUF has llama3 rope frequency factors (rope_freqs.weight); they are not applied")
    kwargs: dict[str, Any] = dict(
        architecture=_ARCHITECTURE_NAMES.get(arch, arch),
        vocab_size=shapes["token_embd.weight"][0],
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=int(get("context_length", 4096)),
        rms_norm_eps=_f32(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=_f32(get("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(meta, arch),
        tie_word_embeddings="output.weight" not in shapes,
        attention_bias="blk.0.attn_q.bias" in shapes,
        qk_norm="blk.0.attn_q_norm.weight" in shapes,
        torch_dtype="float32",
    )
    kwargs.update(_moe_fields(arch, get, shapes, num_layers, intermediate))
    if arch == "deepseek2":
        kwargs.update(_deepseek2_fields(get, shapes, num_layers, heads, kwargs["rope_scaling"]))
    window = get("attention.sliding_window")
    if arch in ("mistral", "phi3") and window:
        kwargs.update(sliding_window=int(window), layer_types=("sliding",) * num_layers)
    if arch == "gemma3":
        kwargs.update(_gemma3_fields(meta, hidden, heads, head_dim, num_layers))
    return ModelConfig(**kwargs)


def _moe_fields(
    arch: str, get: Any, shapes: dict[str, tuple[int, ...]], num_layers: int, intermediate: int
) -> dict[str, Any]:
    """Mixture-of-experts fields: qwen3moe, or llama with experts (how llama.cpp stores Mixtral).
    llama.cpp renormalizes the top-k weights for both; a layer without a router is dense."""
    experts = int(get("expert_count") or 0)
    if not experts or arch == "deepseek2":  # its experts come with the rest: _deepseek2_fields
        return {}
    if arch not in ("qwen3moe", "llama"):
        raise ModelLoadError(f"GGUF {arch} with experts is not supported")
    return {
        "architecture": "qwen3_moe" if arch == "qwen3moe" else "mixtral",
        "num_experts": experts,
        "num_experts_per_tok": int(get("expert_used_count") or 0),
        "moe_intermediate_size": int(get("expert_feed_forward_length") or intermediate),
        "norm_topk_prob": True,
        "dense_layers": tuple(i for i in range(num_layers) if f"blk.{i}.ffn_gate_inp.weight" not in shapes),
    }


def _deepseek2_fields(
    get: Any, shapes: dict[str, tuple[int, ...]], num_layers: int, heads: int, rope_scaling: dict[str, Any] | None
) -> dict[str, Any]:
    """llama.cpp's deepseek2 (DeepSeek-V2 and V3): MLA sizes, yarn's attention scaling and the
    MoE routing. Files from newer converters give the MLA head sizes as key/value_length_mla;
    key/value_length then describe the latent as one head."""
    rope = int(get("rope.dimension_count"))
    rank = int(get("attention.kv_lora_rank"))
    qk = int(get("attention.key_length_mla") or get("attention.key_length"))
    v = int(get("attention.value_length_mla") or get("attention.value_length"))
    sigmoid = int(get("expert_gating_func") or 1) == 2
    experts = int(get("expert_count") or 0)
    dense = int(get("leading_dense_block_count") or 0)
    fields: dict[str, Any] = {
        "architecture": "deepseek_v3" if sigmoid else "deepseek_v2",
        "kv_lora_rank": rank,
        "q_lora_rank": int(get("attention.q_lora_rank") or 0),
        "qk_nope_head_dim": qk - rope,
        "qk_rope_head_dim": rope,
        "v_head_dim": v,
        "num_kv_heads": 1,
        "head_dim": rank + rope,
        "rope_interleave": True,  # llama.cpp rotates DeepSeek's pairs as they are (rope type NORM)
        "num_experts": experts,
        "num_experts_per_tok": int(get("expert_used_count") or 0),
        "moe_intermediate_size": int(get("expert_feed_forward_length") or 0),
        "num_shared_experts": int(get("expert_shared_count") or 0),
        "routed_scaling_factor": _f32(get("expert_weights_scale") or 1.0),
        "norm_topk_prob": bool(get("expert_weights_norm") or False),
        "router_groups": int(get("expert_group_count") or 1),
        "router_topk_groups": int(get("expert_group_used_count") or 1),
        "dense_layers": tuple(range(min(dense, num_layers))),
    }
    if sigmoid:
        fields.update(router_scoring="sigmoid", router_group_score="top2")
        fields["router_correction_bias"] = f"blk.{dense}.exp_probs_b.bias" in shapes
    log_multiplier = get("rope.scaling.yarn_log_multiplier")
    if rope_scaling and rope_scaling["rope_type"] == "yarn" and log_multiplier:
        # llama.cpp keeps 0.1 x mscale_all_dim. DeepSeek's configs set mscale to the same value,
        # which leaves the rotary tables unscaled, as llama.cpp's deepseek2 graph does too.
        m = _f32(log_multiplier) / 0.1
        rope_scaling = {**rope_scaling, "mscale": m, "mscale_all_dim": m}
    fields["rope_scaling"] = rope_scaling
    fields["attention_scale"] = mla_attention_scale(qk, rope_scaling)
    return fields


def _canonical_shapes(shapes: dict[str, tuple[int, ...]], config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Tensor shapes under canonical names, stacked experts and fused projections counted one by one."""
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        if name in _IGNORED:
            continue
        experts = _expert_names(name, shape[0] if shape else 0)
        parts = _fused_parts(name, config)
        split_kv_b = _SPLIT_KV_B.match(name)
        if split_kv_b and split_kv_b.group(2) == "k_b":  # [H, rank, nope], its v_b [H, v, rank]
            H, rank, nope = shape
            out[f"layers.{split_kv_b.group(1)}.attn.kv_b_proj.weight"] = (H * (nope + config.v_head_dim), rank)
        elif split_kv_b:
            continue
        elif experts:
            out.update({n: tuple(shape[1:]) for n in experts})
        elif parts:
            out.update({n: (stop - start, *shape[1:]) for n, (start, stop) in parts.items()})
        else:
            out[canonical_name(name) or name] = shape
    return out


def _fused_parts(gguf_name: str, config: ModelConfig) -> dict[str, tuple[int, int]]:
    """Phi-3's fused tensors: canonical name -> its rows; {} for other tensors and architectures."""
    m = _BLOCK.match(gguf_name)
    if config.architecture != "phi3" or not m or m.group(2) not in _FUSED or m.group(3) != "weight":
        return {}
    return fused_parts(config, m.group(1), _FUSED[m.group(2)])


def _longrope_scaling(gf: GGUFFile, meta: dict[str, Any], config: ModelConfig) -> dict[str, Any]:
    """Phi-3's LongRoPE as rope_scaling: the factors are tensors, the rest metadata."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    def factors(name: str) -> list[float]:
        info = gf.tensors[name]
        return [float(x) for x in dequantize(gf.raw(name), GGMLQuantizationType(info.ggml_type)).reshape(-1)]

    original = meta.get("phi3.rope.scaling.original_context_length") or config.max_position_embeddings
    scaling: dict[str, Any] = {
        "rope_type": "longrope",
        "long_factor": factors("rope_factors_long.weight"),
        "short_factor": factors("rope_factors_short.weight"),
        "original_max_position_embeddings": int(original),
    }
    attn_factor = meta.get("phi3.rope.scaling.attn_factor")
    if attn_factor is not None:
        scaling["attention_factor"] = _f32(attn_factor)
    return scaling


def _expert_names(gguf_name: str, count: int) -> list[str]:
    """Canonical names of the experts stacked in `gguf_name`; [] for other tensors."""
    m = _BLOCK.match(gguf_name)
    if not m or m.group(2) not in _EXPERT_NAMES:
        return []
    layer, part = m.group(1), _EXPERT_NAMES[m.group(2)]
    return [f"layers.{layer}.mlp.experts.{e}.{part}.weight" for e in range(count)]


def _scalar_per_layer(value: Any, key: str) -> int:
    # Some files store one value per layer; nanoinfer supports uniform layers only.
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ModelLoadError(f"per-layer {key} values {sorted(set(value))} are not supported")
        value = value[0]
    return int(value)


def _gemma3_fields(meta: dict[str, Any], hidden: int, heads: int, head_dim: int, num_layers: int) -> dict[str, Any]:
    pattern = int(meta.get("gemma3.attention.sliding_window_pattern") or 6)  # llama.cpp hard-codes 6 for gemma3
    window = meta.get("gemma3.attention.sliding_window")
    # llama.cpp: queries scaled by 1/sqrt(head_dim), except the 27B (62 layers) uses 1/sqrt(hidden/heads).
    # This equals HF's query_pre_attn_scalar ** -0.5 (256 for the 270M/1B/4B/12B, 168 for the 27B).
    scalar = hidden // heads if num_layers == 62 else head_dim
    softcap = meta.get("gemma3.final_logit_softcapping")
    return dict(
        norm_weight_offset=1.0,
        post_norms=True,
        activation="gelu_tanh",
        embedding_scale=math.sqrt(hidden),
        attention_scale=scalar**-0.5,
        sliding_window=int(window) if window else None,
        layer_types=tuple("full" if (i + 1) % pattern == 0 else "sliding" for i in range(num_layers)),
        rope_local_theta=10000.0,  # not stored in GGUF; llama.cpp uses 10000 for gemma3's local layers
        final_logit_softcapping=_f32(softcap) if softcap else None,
    )


def _rope_scaling(meta: dict[str, Any], arch: str) -> dict[str, Any] | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if kind in (None, "none") and not factor:
        return None
    if kind in (None, "none"):
        kind = "linear"  # old files give only a factor
    scaling: dict[str, Any] = {"rope_type": kind, "factor": _f32(factor or 1.0)}
    extra = {
        "original_context_length": "original_max_position_embeddings",
        "attn_factor": "attention_factor",
        "yarn_beta_fast": "beta_fast",
        "yarn_beta_slow": "beta_slow",
    }
    for gguf_key, hf_key in extra.items():
        value = meta.get(f"{arch}.rope.scaling.{gguf_key}")
        if value is not None:
            scaling[hf_key] = int(value) if hf_key.startswith("original") else _f32(value)
    return scaling


# ---------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------


def canonical_name(gguf_name: str) -> str | None:
    """Canonical weight name for a GGUF tensor name (None when it is not a model weight)."""
    m = _BLOCK.match(gguf_name)
    if m:
        layer, part, kind = m.groups()
        if f"{part}.{kind}" in _RENAMED:
            return f"layers.{layer}.{_RENAMED[f'{part}.{kind}']}"
        return f"layers.{layer}.{_LAYER_NAMES[part]}.{kind}" if part in _LAYER_NAMES else None
    base, _, kind = gguf_name.rpartition(".")
    return f"{_GLOBAL_NAMES[base]}.{kind}" if base in _GLOBAL_NAMES else None


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp's converter reorders each head's rows from rotate-half (HF) to interleaved pairs;
    # this is its inverse: rows (head, pair, 2) -> (head, 2, pair).
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _load_weights(
    gf: GGUFFile, config: ModelConfig, path: Path, weight_filter: WeightFilter | None = None
) -> dict[str, torch.Tensor]:
    permute = config.architecture in ("llama", "mistral", "mixtral")
    gemma = config.architecture == "gemma3"
    weights: dict[str, torch.Tensor] = {}

    def keep(name: str, w: np.ndarray) -> None:
        tensor = torch.from_numpy(np.ascontiguousarray(w))
        kept = tensor if weight_filter is None else weight_filter(name, tensor, config)
        if kept is not None:
            weights[name] = kept

    halves: dict[tuple[str, str], np.ndarray] = {}  # (layer, k_b | v_b) -> tensor
    for gname, info in gf.tensors.items():
        split_kv_b = _SPLIT_KV_B.match(gname)
        if split_kv_b:
            halves[(split_kv_b.group(1), split_kv_b.group(2))] = _dequantized(gf, gname, info, path)
            continue
        name = canonical_name(gname)
        experts = _expert_names(gname, info.shape[0])
        fused = _fused_parts(gname, config)
        if name is None and not experts and not fused:
            if gname in _IGNORED:
                continue
            raise ModelLoadError(f"{path.name}: unexpected tensor {gname!r} for {config.architecture}")
        w = _dequantized(gf, gname, info, path)
        if experts:
            for e, n in enumerate(experts):
                keep(n, w[e])
            continue
        if fused:
            for n, (a, b) in fused.items():
                keep(n, w[a:b])
            continue
        assert name is not None
        if permute and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = _unpermute(w, config.num_heads)
        elif permute and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = _unpermute(w, config.num_kv_heads)
        if gemma and name.endswith("norm.weight"):
            w = w - 1.0  # the converter stored (1 + w) for llama.cpp; the model adds the 1 itself
        keep(name, w)
    for (layer, which), k_b in halves.items():
        if which == "k_b":  # kv_b_proj rows per head: its nope key rows, then its value rows
            v_b = halves[(layer, "v_b")]
            kv_b = np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1).reshape(-1, k_b.shape[1])
            keep(f"layers.{layer}.attn.kv_b_proj.weight", kv_b)
    return weights


def _dequantized(gf: GGUFFile, gname: str, info: Any, path: Path) -> np.ndarray:
    """One tensor as float32 in HF layout, copied out of the file mapping (F32 tensors come back
    as read-only views of it)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType(info.ggml_type)
    try:
        w = dequantize(gf.raw(gname), qtype)
    except NotImplementedError:
        raise ModelLoadError(f"{path.name}: tensor {gname} uses unsupported type {qtype.name}") from None
    except Exception as e:
        raise ModelLoadError(f"{path.name}: cannot decode tensor {gname}: {_one_line(e)}") from None
    return np.array(w, dtype=np.float32, copy=True).reshape(info.shape)


def check_shapes(config: ModelConfig, weights: dict[str, Any], source: str) -> None:
    """Raise ModelLoadError when weights (tensors or shapes) are missing, unexpected, or disagree with config."""
    expected = expected_shapes(config)
    missing = [n for n in expected if n not in weights]
    if missing:
        raise ModelLoadError(f"{source}: missing weights {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    extra = [n for n in weights if n not in expected]
    if extra:
        raise ModelLoadError(f"{source}: unexpected weights {extra[:3]}{' ...' if len(extra) > 3 else ''}")
    for name, shape in expected.items():
        got = tuple(getattr(weights[name], "shape", weights[name]))
        if got != shape:
            raise ModelLoadError(f"{source}: weight {name} has shape {got}, config implies {shape}")


def _file_type(meta: dict[str, Any], gf: GGUFFile) -> str:
    from gguf import GGMLQuantizationType, LlamaFileType

    ftype = meta.get("general.file_type")
    if ftype is not None:
        try:
            return LlamaFileType(int(ftype)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except (TypeError, ValueError):
            pass
    return "+".join(sorted({GGMLQuantizationType(t.ggml_type).name for t in gf.tensors.values()}))


__all__ = [
    "load_gguf",
    "load_gguf_tokenizer",
    "open_gguf",
    "config_from_metadata",
    "canonical_name",
    "expected_shapes",
    "check_shapes",
]
