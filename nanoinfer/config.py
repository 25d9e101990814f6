"""ModelConfig: the one normalized description of a decoder-only Transformer.

Loaders (HF config.json, GGUF metadata) translate their formats into this object;
every other part of nanoinfer reads model dimensions from here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from nanoinfer.errors import ModelLoadError

SUPPORTED_ARCHITECTURES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma3",
    "qwen3_moe",
    "mixtral",
    "phi3",
    "deepseek_v2",
    "deepseek_v3",
)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one model. Families differ only by these fields."""

    architecture: str  # one of SUPPORTED_ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # HF-style dict: {"rope_type": "linear"|"dynamic"|"llama3"|"yarn", "factor": ..., ...} or None.
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # qwen2: bias on q/k/v
    qk_norm: bool = False  # qwen3, gemma3: per-head RMSNorm on q and k before RoPE
    norm_weight_offset: float = 0.0  # gemma: RMSNorm multiplies by (offset + w)
    post_norms: bool = False  # gemma3: extra norms on attention and MLP outputs
    activation: str = "silu"  # "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    embedding_scale: float = 1.0  # gemma: embeddings times sqrt(hidden_size)
    attention_scale: float | None = None  # None means head_dim ** -0.5
    sliding_window: int | None = None  # window of the layers marked "sliding"
    layer_types: tuple[str, ...] = ()  # per layer: "full" or "sliding"; empty means all full
    rope_local_theta: float | None = None  # gemma3: rope base of sliding layers
    final_logit_softcapping: float | None = None
    torch_dtype: str = "float32"  # dtype the weights were saved in
    # Mixture of experts (qwen3_moe, mixtral): routed experts per MoE layer; 0 means dense MLPs.
    num_experts: int = 0
    num_experts_per_tok: int = 0  # top k
    moe_intermediate_size: int = 0  # each expert's MLP width
    norm_topk_prob: bool = True  # renormalize the top-k router weights to sum to one
    dense_layers: tuple[int, ...] = ()  # layers of a MoE model whose MLP is dense
    router_scoring: str = "softmax"  # or "sigmoid" (DeepSeek-V3): how the router scores experts
    router_groups: int = 1  # DeepSeek: experts in groups, of which only the best compete
    router_topk_groups: int = 1  # ... this many groups per token
    router_group_score: str = "max"  # a group's score: its best expert ("max") or best two summed ("top2")
    routed_scaling_factor: float = 1.0  # the routed experts' weights times this
    router_correction_bias: bool = False  # DeepSeek-V3: a learned per-expert bias on the choice only
    num_shared_experts: int = 0  # DeepSeek: experts every token goes through besides its top k
    # Multi-head latent attention (DeepSeek): the cache holds one latent row per token, so for
    # these models num_kv_heads is 1 and head_dim is kv_lora_rank + qk_rope_head_dim.
    kv_lora_rank: int = 0  # 0: ordinary attention
    q_lora_rank: int = 0  # 0: queries straight from hidden states
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False  # rotary dims in interleaved pairs (DeepSeek), not halves

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"unsupported architecture {self.architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"num_heads ({self.num_heads}) is not a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("full",) * self.num_layers)
        if len(self.layer_types) != self.num_layers:
            raise ModelLoadError("layer_types must have one entry per layer")
        if self.router_scoring not in ("softmax", "sigmoid") or self.router_group_score not in ("max", "top2"):
            raise ModelLoadError(f"unknown router scoring {self.router_scoring!r} / {self.router_group_score!r}")
        if self.num_experts and (
            self.num_experts % self.router_groups or not 0 < self.router_topk_groups <= self.router_groups
        ):
            raise ModelLoadError(
                f"{self.num_experts} experts cannot form {self.router_groups} groups with "
                f"{self.router_topk_groups} chosen per token"
            )
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ModelLoadError(
                f"num_experts_per_tok must be between 1 and num_experts ({self.num_experts}), "
                f"got {self.num_experts_per_tok}"
            )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def scale(self) -> float:
        return self.attention_scale if self.attention_scale is not None else self.head_dim**-0.5

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def rope_dim(self) -> int:
        """Dimensions RoPE rotates per head: all of head_dim, or MLA's decoupled rope part."""
        return self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def kv_values_per_token(self) -> int:
        """Values one token stores per layer: K and V for every KV head, or MLA's one latent row."""
        return self.head_dim if self.is_mla else 2 * self.num_kv_heads * self.head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0 and layer not in self.dense_layers

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == "sliding" and self.sliding_window is not None

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Normalize a transformers config.json dict."""
        model_type = hf.get("model_type", "")
        if model_type == "gemma3" and "text_config" in hf:  # multimodal wrapper
            # tie_word_embeddings and dtype may sit on the outer config only
            outer: dict[str, Any] = {k: hf[k] for k in ("tie_word_embeddings", "torch_dtype", "dtype") if k in hf}
            hf = {**outer, **hf["text_config"], "model_type": "gemma3"}
        if model_type == "gemma3_text":
            model_type = "gemma3"
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"unsupported architecture {model_type or hf.get('architectures')!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            hidden = hf["hidden_size"]
            heads = hf["num_attention_heads"]
            kv_heads = hf.get("num_key_value_heads") or heads
            head_dim = hf.get("head_dim") or hidden // heads
            num_layers = hf["num_hidden_layers"]
            common = dict(
                architecture=model_type,
                vocab_size=hf["vocab_size"],
                hidden_size=hidden,
                intermediate_size=hf["intermediate_size"],
                num_layers=num_layers,
                num_heads=heads,
                num_kv_heads=kv_heads,
                head_dim=head_dim,
                max_position_embeddings=hf.get("max_position_embeddings", 4096),
                rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                rope_theta=_rope_theta(hf),
                rope_scaling=_rope_scaling(hf),
                tie_word_embeddings=hf.get("tie_word_embeddings", model_type == "gemma3"),
                torch_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "float32"),
            )
        except KeyError as e:
            raise ModelLoadError(f"config.json lacks required field {e.args[0]!r}") from None
        if model_type == "qwen2":
            common["attention_bias"] = True
        if model_type in ("llama", "mistral"):
            common["attention_bias"] = bool(hf.get("attention_bias", False))
        if model_type in ("qwen3", "qwen3_moe"):
            common["qk_norm"] = True
            common["attention_bias"] = bool(hf.get("attention_bias", False))
        if model_type == "phi3":
            _check_phi3(hf)
        if model_type in ("mistral", "mixtral", "phi3") and hf.get("sliding_window"):
            common["sliding_window"] = hf["sliding_window"]
            common["layer_types"] = ("sliding",) * num_layers
        if model_type in ("qwen2", "qwen3", "qwen3_moe") and hf.get("use_sliding_window") and hf.get("sliding_window"):
            common["sliding_window"] = hf["sliding_window"]
            max_window = hf.get("max_window_layers", num_layers)
            default_types = tuple("sliding" if i >= max_window else "full" for i in range(num_layers))
            # transformers 5 writes the per-layer list explicitly; it wins over max_window_layers
            common["layer_types"] = _layer_types(hf) or default_types
        if model_type == "gemma3":
            common.update(
                qk_norm=True,
                norm_weight_offset=1.0,
                post_norms=True,
                activation="gelu_tanh",
                embedding_scale=math.sqrt(hidden),
                attention_scale=hf.get("query_pre_attn_scalar", head_dim) ** -0.5,
                sliding_window=hf.get("sliding_window"),
                layer_types=_gemma3_layer_types(hf, num_layers),
                rope_local_theta=_gemma3_local_theta(hf),
                final_logit_softcapping=hf.get("final_logit_softcapping"),
            )
        common.update(_moe_fields(model_type, hf, num_layers))
        if model_type in ("deepseek_v2", "deepseek_v3"):
            common.update(_deepseek_fields(model_type, hf, num_layers, common["rope_scaling"]))
        return cls(**common)


def _deepseek_fields(
    model_type: str, hf: dict[str, Any], num_layers: int, rope_scaling: dict[str, Any] | None
) -> dict[str, Any]:
    """DeepSeek-V2/V3: MLA dimensions, the MoE layers and their routing."""
    try:
        nope, rope, rank = hf["qk_nope_head_dim"], hf["qk_rope_head_dim"], hf["kv_lora_rank"]
        experts = hf["n_routed_experts"] if "n_routed_experts" in hf else hf["num_local_experts"]
        fields: dict[str, Any] = {
            "kv_lora_rank": rank,
            "q_lora_rank": hf.get("q_lora_rank") or 0,
            "qk_nope_head_dim": nope,
            "qk_rope_head_dim": rope,
            "v_head_dim": hf["v_head_dim"],
            "num_kv_heads": 1,
            "head_dim": rank + rope,
            "attention_scale": mla_attention_scale(nope + rope, rope_scaling),
            "rope_interleave": model_type == "deepseek_v2" or bool(hf.get("rope_interleave", True)),
            "num_experts": experts or 0,
            "num_experts_per_tok": hf["num_experts_per_tok"] if experts else 0,
            "moe_intermediate_size": hf.get("moe_intermediate_size") or 0,
            "num_shared_experts": hf.get("n_shared_experts") or 0,
            "routed_scaling_factor": float(hf.get("routed_scaling_factor") or 1.0),
            "router_groups": hf.get("n_group") or 1,
            "router_topk_groups": hf.get("topk_group") or 1,
        }
    except KeyError as e:
        raise ModelLoadError(f"config.json of a {model_type} model lacks required field {e.args[0]!r}") from None
    if hf.get("attention_bias"):
        raise ModelLoadError(f"{model_type} with attention_bias is not supported")
    first_dense, freq = hf.get("first_k_dense_replace") or 0, hf.get("moe_layer_freq") or 1
    fields["dense_layers"] = tuple(i for i in range(num_layers) if i < first_dense or i % freq)
    if model_type == "deepseek_v2":  # softmax; transformers' V2 never renormalizes
        if hf.get("topk_method", "greedy") == "greedy":
            fields.update(router_groups=1, router_topk_groups=1)
        fields["norm_topk_prob"] = False
    else:  # V3: sigmoid, a correction bias, groups scored by their best two experts
        fields.update(router_scoring="sigmoid", router_correction_bias=True, router_group_score="top2")
        fields["norm_topk_prob"] = bool(hf.get("norm_topk_prob", True))
    return fields


def mla_attention_scale(qk_head_dim: int, rope_scaling: dict[str, Any] | None) -> float:
    """DeepSeek's softmax scale: 1/sqrt(qk head dim), times yarn's mscale squared when set."""
    scale = qk_head_dim**-0.5
    if rope_scaling and rope_scaling.get("rope_type") == "yarn" and rope_scaling.get("mscale_all_dim"):
        factor, m = rope_scaling["factor"], rope_scaling["mscale_all_dim"]
        mscale = 0.1 * m * math.log(factor) + 1.0 if factor > 1 else 1.0
        scale *= mscale * mscale
    return scale


def _check_phi3(hf: dict[str, Any]) -> None:
    """Refuse the Phi-3 variants our one attention path cannot run exactly."""
    # transformers 4 writes it at the top (Phi-4-mini: 0.75), transformers 5 inside rope_parameters
    for rotary in (hf.get("partial_rotary_factor"), (hf.get("rope_parameters") or {}).get("partial_rotary_factor")):
        if rotary not in (None, 1, 1.0):
            raise ModelLoadError(
                f"phi3 partial_rotary_factor {rotary} is not supported (only 1.0: RoPE on the whole head)"
            )


def _moe_fields(model_type: str, hf: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """The mixture-of-experts fields of a qwen3_moe or mixtral config; {} for dense families."""
    try:
        if model_type == "qwen3_moe":
            step = hf.get("decoder_sparse_step") or 1
            dense_only = set(hf.get("mlp_only_layers") or ())
            return {
                # transformers 5 writes num_local_experts; released checkpoints say num_experts
                "num_experts": hf["num_experts"] if "num_experts" in hf else hf["num_local_experts"],
                "num_experts_per_tok": hf["num_experts_per_tok"],
                "moe_intermediate_size": hf["moe_intermediate_size"],
                "norm_topk_prob": bool(hf.get("norm_topk_prob", False)),
                "dense_layers": tuple(i for i in range(num_layers) if i in dense_only or (i + 1) % step),
            }
        if model_type == "mixtral":  # every layer sparse, experts as wide as intermediate_size
            return {
                "num_experts": hf["num_local_experts"],
                "num_experts_per_tok": hf["num_experts_per_tok"],
                "moe_intermediate_size": hf["intermediate_size"],
                "norm_topk_prob": True,
            }
    except KeyError as e:
        raise ModelLoadError(f"config.json of a {model_type} model lacks required field {e.args[0]!r}") from None
    return {}


def _rope_theta(hf: dict[str, Any]) -> float:
    if "rope_theta" in hf:
        return float(hf["rope_theta"])
    # transformers 5 nests it: rope_parameters = {"rope_theta": ..., "rope_type": ...}
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params:  # gemma3 in transformers 5: one entry per layer type
        params = params["full_attention"]
    # gemma3's global layers default to 1e6 in transformers; everyone else to 1e4
    default = 1_000_000.0 if hf.get("model_type") in ("gemma3", "gemma3_text") else 10000.0
    return float(params.get("rope_theta", default))


def _gemma3_local_theta(hf: dict[str, Any]) -> float:
    """RoPE base of gemma3's sliding layers (transformers 4: rope_local_base_freq; 5: nested)."""
    if "rope_local_base_freq" in hf:
        return float(hf["rope_local_base_freq"])
    local = (hf.get("rope_parameters") or {}).get("sliding_attention") or {}
    return float(local.get("rope_theta", 10000.0))


def _rope_scaling(hf: dict[str, Any]) -> dict[str, Any] | None:
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
    if scaling and "full_attention" in scaling:
        scaling = scaling["full_attention"]
    if not scaling:
        return None
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind == "su":  # early Phi-3 configs' name for LongRoPE
        kind = "longrope"
    if kind in (None, "default"):
        return None
    scaling = {k: v for k, v in scaling.items() if k not in ("rope_theta", "type")} | {"rope_type": kind}
    if kind in ("llama3", "yarn", "longrope") and "original_max_position_embeddings" not in scaling:
        # transformers fills this in from the model's context length when the config omits it
        scaling["original_max_position_embeddings"] = hf.get(
            "original_max_position_embeddings", hf.get("max_position_embeddings", 4096)
        )
    return scaling


def _layer_types(hf: dict[str, Any]) -> tuple[str, ...]:
    """Per-layer attention kinds from transformers' layer_types list; empty when absent."""
    return tuple("sliding" if t == "sliding_attention" else "full" for t in hf.get("layer_types") or ())


def _gemma3_layer_types(hf: dict[str, Any], num_layers: int) -> tuple[str, ...]:
    if hf.get("layer_types"):
        return _layer_types(hf)
    pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
    return tuple("full" if (i + 1) % pattern == 0 else "sliding" for i in range(num_layers))


@dataclass(frozen=True)
class GenerationDefaults:
    """Defaults from generation_config.json (or GGUF metadata), used when a request does not set them."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    max_new_tokens: int | None = None

    @classmethod
    def from_hf(cls, gen: dict[str, Any]) -> GenerationDefaults:
        eos = gen.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            temperature=gen.get("temperature") if gen.get("do_sample", True) else 0.0,
            top_p=gen.get("top_p"),
            top_k=gen.get("top_k"),
            repetition_penalty=gen.get("repetition_penalty"),
            eos_token_ids=eos_ids,
            bos_token_id=gen.get("bos_token_id"),
            max_new_tokens=gen.get("max_new_tokens"),
        )


KV_CACHE_DTYPES = ("auto", "float32", "float16", "bfloat16")  # EngineConfig.kv_cache_dtype
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")  # EngineConfig.dtype


@dataclass(frozen=True)
class RequestLimits:
    """Bounds on what one request may ask for. Each guards the engine thread or the server's
    memory against one huge or hostile request; going over one is refused with the field's name."""

    max_stop_strings: int = 16  # each is searched for after every token
    max_stop_string_chars: int = 256
    max_stop_token_ids: int = 64
    max_logit_bias: int = 300  # entries; values must lie in [-100, 100] as OpenAI documents
    max_n: int = 128  # choices of one prompt: each is a sequence in the batch
    max_choices: int = 128  # prompts x n of one completions request
    max_top_logprobs: int = 20  # OpenAI's own cap
    max_messages: int = 1024
    max_prompt_chars: int = 2_000_000  # text to tokenize, over all prompts or messages of a request

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{f.name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class EngineConfig:
    """Knobs of the serving engine (KV pool, batching, prefix cache)."""

    # Tokens per KV block. Decode attention reads each sequence's blocks from scattered addresses,
    # one KV head's run of block_size rows at a time, and short runs starve it of bandwidth, so
    # blocks are long (docs/performance.md, "Block size"). The prefix cache does not follow them:
    # see prefix_page_size.
    block_size: int = 128
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    kv_cache_memory: int | None = None  # bytes; None: max_model_len * max_num_seqs tokens
    enable_prefix_cache: bool = True
    # Tokens per prefix-cache page: the radix tree matches and shares prefixes in pages, not in
    # blocks, so a shared prefix loses fewer than this many tokens of reuse whatever block_size is
    # (pages of a partly matched block are copied into a fresh one). Capped at block_size, and must
    # divide it (checked by KVCacheManager).
    prefix_page_size: int = 16
    # one of DTYPE_CHOICES: float weights, and activations except on CPU (always float32 there).
    # auto is float32 weights; unlike an explicit float32 it lets the KV cache be float16.
    dtype: str = "auto"
    # one of KV_CACHE_DTYPES; auto: float16 where our C attention reads the cache (CPU) unless
    # dtype is an explicit float32, else the activations' dtype (see engine.kv_cache_dtype)
    kv_cache_dtype: str = "auto"
    quantization: str | None = None  # "none", "int8", "int4"; None: the model's default (see registry)
    # int8 layers and the quantized head switch to a dequantized float copy above this many rows
    # (None: never) where our C int8 kernel cannot run them: torch's int8 kernel loses to fp32
    # GEMM there on CPUs without native bf16 GEMM. Ours needs no copy.
    dense_above_rows: int | None = 16
    device: str = "cpu"
    limits: RequestLimits = field(default_factory=RequestLimits)
    # vLLM's speculative_config: {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
    # "prompt_lookup_min": 2}, or its JSON text; None: no speculation (see engine/speculative.py).
    speculative_config: Any = None
    # LoRA serving (vLLM's names): adapters resident at once (the most distinct adapters in one
    # batch) and the largest rank accepted; requests name theirs with a LoRARequest.
    enable_lora: bool = False
    max_loras: int = 4
    max_lora_rank: int = 16
    # A PEFT LoRA adapter folded into the weights at load: one adapter at base-model speed.
    merge_lora: str | None = None
    # Ranks a model is split over, Megatron-style (engine/workers.py); > 1 spawns the other ranks
    # on this host, or joins the ranks torchrun started.
    tensor_parallel_size: int = 1
    # Stages the layers are split into, one rank each, hidden states passed along (engine/workers.py).
    pipeline_parallel_size: int = 1
    # Engine replicas behind one server or LLM, requests routed by cached prefix, then load
    # (engine/data_parallel.py).
    data_parallel_size: int = 1


# Decimal units are powers of 1000, binary ones powers of 1024. The bare letters K/M/G/T are
# binary, as in `docker --memory 2g`, because that is what people typing them usually mean.
_MEMORY_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_MEMORY_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")


def parse_memory(value: str | int) -> int:
    """Parse a memory size such as ``"2GiB"``, ``"512MiB"``, ``"1.5GB"`` or ``"1000000"`` to bytes.

    Units are case-insensitive: B, KB/MB/GB/TB (powers of 1000), KiB/MiB/GiB/TiB and the bare
    K/M/G/T (powers of 1024). Fractions of a byte are rounded down. Raises ValueError, naming
    the accepted forms, on anything else (negative numbers, unknown units, junk).
    """
    if isinstance(value, bool):  # bool is an int subclass; True bytes is surely a mistake
        raise ValueError(f"invalid memory size {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"memory size must not be negative, got {value}")
        return value
    match = _MEMORY_RE.match(value) if isinstance(value, str) else None
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _MEMORY_UNITS:
        raise ValueError(
            f"invalid memory size {value!r}: expected a number with an optional unit "
            "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB, K, M, G, T), e.g. '2GiB', '1.5GB', '1000000'"
        )
    try:
        number = Decimal(match.group(1))  # Decimal: '0.1GiB' must not suffer float rounding
    except InvalidOperation:  # pragma: no cover - the regex admits only valid decimals
        raise ValueError(f"invalid memory size {value!r}") from None
    return int(number * _MEMORY_UNITS[unit])
