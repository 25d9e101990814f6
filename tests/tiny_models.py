"""Tiny randomly initialized transformers models saved to disk: the oracles of the parity tests.

Each case builds a transformers config with toy sizes, fills every parameter (biases and norms
included) with seeded random values, saves it with safetensors next to a small trained BPE
tokenizer, and keeps the in-memory transformers model to compare against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

VOCAB_SIZE = 300
BOS, EOS, CHAT_START = "<|bos|>", "<|im_end|>", "<|im_start|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A tiny model for testing an inference engine, nothing more.",
    "Hello world! How are you today? I am fine, thank you.",
    "Attention is all you need; rotary embeddings rotate pairs of dimensions.",
    "Sliding windows limit how far back a token may look.",
]

# Sizes shared by every case: small enough to build in well under a second.
_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)


_TIED_EMBED_SHRINK = 0.3


@dataclass
class TinyCase:
    """One architecture variant: transformers config class plus the fields that differ from _COMMON."""

    config_cls: Callable[..., Any]
    overrides: dict[str, Any]


def _cases() -> dict[str, TinyCase]:
    """The case table; built lazily so importing this module stays cheap."""
    t = transformers
    gemma3 = dict(
        num_hidden_layers=3,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        sliding_window=8,  # a 32-token prompt crosses it several times
        query_pre_attn_scalar=24,  # differs from head_dim, so the attention scale is checked
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 5_000.0},
        },
        final_logit_softcapping=30.0,
        tie_word_embeddings=True,
        hidden_activation="gelu_pytorch_tanh",
    )
    llama3_rope = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,  # so the smoothed band lands inside head_dim 16
    }
    longrope = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": [1.0 + 0.2 * i for i in range(8)],
        "long_factor": [2.0 + 0.7 * i for i in range(8)],
        "original_max_position_embeddings": 24,
    }
    deepseek = dict(
        kv_lora_rank=32,
        q_lora_rank=None,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        head_dim=8,
        num_key_value_heads=4,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        first_k_dense_replace=1,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=1.5,
    )
    deepseek_yarn = {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 64,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
        "beta_fast": 32,
        "beta_slow": 1,
    }
    yarn_rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
    return {
        "llama": TinyCase(t.LlamaConfig, {}),
        "mistral": TinyCase(t.MistralConfig, dict(num_key_value_heads=1, sliding_window=12)),  # MQA + window
        "qwen2": TinyCase(t.Qwen2Config, {}),  # q/k/v bias
        "qwen3": TinyCase(t.Qwen3Config, {}),  # q/k norm
        "gemma3": TinyCase(t.Gemma3TextConfig, gemma3),
        "llama3_rope": TinyCase(t.LlamaConfig, dict(rope_parameters=llama3_rope)),
        "linear_rope": TinyCase(t.LlamaConfig, dict(rope_parameters={"rope_type": "linear", "factor": 4.0})),
        "yarn_rope": TinyCase(t.Qwen3Config, dict(rope_parameters=yarn_rope)),
        "tied": TinyCase(t.Qwen3Config, dict(tie_word_embeddings=True, num_key_value_heads=1)),
        # 8 experts, top 2 without renormalization; layer 1 keeps a dense MLP (mlp_only_layers)
        "qwen3_moe": TinyCase(
            t.Qwen3MoeConfig, dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[1])
        ),
        # q/k/v and gate/up stored fused; a sliding window over every layer
        "phi3": TinyCase(t.Phi3Config, dict(sliding_window=12)),
        # LongRoPE: per-frequency factors; the 32-token prompt passes the original 24 positions,
        # so the long factors and the attention factor sqrt(1 + ln(256/24) / ln 24) are checked
        "phi3_longrope": TinyCase(t.Phi3Config, dict(rope_parameters=longrope, original_max_position_embeddings=24)),
        # MLA (latent 32 + rope 8 per token) with queries straight from hidden states; layer 0
        # dense, layer 1 8 experts + 1 shared, softmax in the best 2 of 4 groups, x 1.5
        "deepseek_v2": TinyCase(t.DeepseekV2Config, dict(deepseek, topk_method="group_limited_greedy")),
        # DeepSeek-V2-Lite's kind of yarn: mscale folded into the softmax scale as well
        "deepseek_v2_yarn": TinyCase(t.DeepseekV2Config, dict(deepseek, rope_parameters=deepseek_yarn)),
        # MLA with a query bottleneck (24), interleaved rope pairs; sigmoid routing, renormalized, x 2.5
        "deepseek_v3": TinyCase(t.DeepseekV3Config, dict(deepseek, q_lora_rank=24, routed_scaling_factor=2.5)),
        # 4 experts as wide as intermediate_size, top 2 renormalized, every layer sparse
        "mixtral": TinyCase(t.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2)),
    }


CASE_IDS = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma3",
    "llama3_rope",
    "linear_rope",
    "yarn_rope",
    "tied",
    "qwen3_moe",
    "mixtral",
    "phi3",
    "phi3_longrope",
    "deepseek_v2",
    "deepseek_v2_yarn",
    "deepseek_v3",
)


def hf_config(case_id: str, **extra: Any) -> Any:
    """The transformers config object of one case (eager attention, fp32)."""
    case = _cases()[case_id]
    kwargs = {**_COMMON, **case.overrides, **extra}
    config = case.config_cls(**kwargs)
    config._attn_implementation = "eager"  # the reference math, no fused kernels
    return config


def build_hf_model(case_id: str, seed: int = 0, **extra: Any) -> torch.nn.Module:
    """A transformers causal LM of one case with seeded random weights, in eval mode."""
    config = hf_config(case_id, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    _randomize(model, seed)
    return model.eval()


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Refill every parameter: HF init leaves biases at 0 and norms at 1, which would hide bugs."""
    gen = torch.Generator().manual_seed(seed)
    # gemma stores w and multiplies by (1 + w) at run time, so its norms centre on 0
    norm_offset = 1.0 if "gemma" in type(model).__name__.lower() else 0.0
    # A tied embedding is also the output head, and a large one makes every model just repeat its
    # input token; keep it small and let the final norm restore O(1) logits.
    shrink = _TIED_EMBED_SHRINK if model.config.tie_word_embeddings else 1.0
    embed_std = shrink * model.config.hidden_size**-0.5 if shrink != 1.0 else 1.0

    def randn(shape: torch.Size) -> torch.Tensor:
        return torch.randn(shape, generator=gen)

    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1 and "norm" in name:
                gain = 1 / shrink if name == "model.norm.weight" else 1.0
                param.copy_(gain * (1.0 + 0.1 * randn(param.shape)) - norm_offset)
            elif param.ndim == 1:  # biases
                param.copy_(0.1 * randn(param.shape))
            elif "embed" in name:
                param.copy_(embed_std * randn(param.shape))
            else:
                # fan-in scaling keeps activations O(1) so attention is far from uniform
                param.copy_(randn(param.shape) / param.shape[1] ** 0.5)


def build_tokenizer() -> Any:
    """A byte-level BPE trained on a few sentences, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<|pad|>", BOS, EOS, CHAT_START],  # ids 0..3 match _COMMON's pad/bos/eos
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token="<|pad|>",
        chat_template=CHAT_TEMPLATE,
    )


def save_case(model: torch.nn.Module, tokenizer: Any, directory: Path, **save_kwargs: Any) -> Path:
    """Write model (safetensors) and tokenizer into one directory, like a hub snapshot."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True, **save_kwargs)
    tokenizer.save_pretrained(directory)
    return directory
