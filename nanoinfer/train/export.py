"""A fully fine-tuned model written as a Hugging Face model directory, which transformers and
nanoinfer both load: config.json, model.safetensors, tokenizer files, generation_config.json.

A model that came from a HF directory keeps its own config and tokenizer files; one that came
from a GGUF file gets a config.json written from our ModelConfig and a tokenizer.json from the
tokenizer we built out of the GGUF metadata.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from nanoinfer.config import ModelConfig
from nanoinfer.loading.hf import hf_name
from nanoinfer.loading.package import ModelPackage
from nanoinfer.model.transformer import Transformer

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "phi3": "Phi3ForCausalLM",
}
# Phi-3 keeps these fused in its checkpoints: fused HF suffix -> the parts, in row order
_PHI3_FUSED = {
    "self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}


def save_hf_model(model: Transformer, package: ModelPackage, directory: str | Path) -> None:
    """Write `model` (float weights) with the package's tokenizer as a HF model directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    tensors = {_hf_tensor_name(name, config): t.float().contiguous() for name, t in model.canonical_weights().items()}
    if config.architecture == "phi3":
        tensors = _fuse_phi3(tensors, config.num_layers)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    source = Path(package.source)
    if source.is_dir() and (source / "config.json").is_file():
        hf = json.loads((source / "config.json").read_text())
        hf["torch_dtype"] = "float32"
        (directory / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        for name in _TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy(source / name, directory / name)
    else:
        (directory / "config.json").write_text(json.dumps(hf_config(config, package), indent=2) + "\n")
        _write_tokenizer(package, directory)
    generation = {
        "bos_token_id": package.generation.bos_token_id,
        "eos_token_id": list(package.generation.eos_token_ids) or None,
    }
    for key in ("temperature", "top_p", "top_k", "repetition_penalty"):
        value = getattr(package.generation, key)
        if value is not None:
            generation[key] = value
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def _fuse_phi3(tensors: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    for i in range(num_layers):
        prefix = f"model.layers.{i}."
        for fused, parts in _PHI3_FUSED.items():
            tensors[prefix + fused] = torch.cat([tensors.pop(prefix + part) for part in parts])
    return tensors


def _hf_tensor_name(canonical: str, config: ModelConfig) -> str:
    if canonical == "embed.weight":
        return "model.embed_tokens.weight"
    if canonical == "norm.weight":
        return "model.norm.weight"
    return hf_name(canonical, config)


def hf_config(config: ModelConfig, package: ModelPackage) -> dict[str, Any]:
    """config.json for a model that came without one (GGUF): the inverse of ModelConfig.from_hf."""
    c = config
    tokenizer = package.tokenizer
    hf: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[c.architecture]],
        "model_type": "gemma3_text" if c.architecture == "gemma3" else c.architecture,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": c.rope_scaling,
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": c.attention_bias,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "torch_dtype": "float32",
        "hidden_act": "gelu_pytorch_tanh" if c.activation == "gelu_tanh" else "silu",
    }
    if c.sliding_window and c.architecture in ("qwen2", "qwen3", "qwen3_moe"):
        hf.update(use_sliding_window=True, sliding_window=c.sliding_window, layer_types=_layer_types(c))
    elif c.sliding_window:
        hf["sliding_window"] = c.sliding_window
    if c.architecture == "qwen3_moe":
        hf.update(
            num_experts=c.num_experts,
            num_experts_per_tok=c.num_experts_per_tok,
            moe_intermediate_size=c.moe_intermediate_size,
            norm_topk_prob=c.norm_topk_prob,
            decoder_sparse_step=1,
            mlp_only_layers=list(c.dense_layers),
        )
    if c.architecture == "mixtral":
        hf.update(num_local_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok)
    if c.architecture == "gemma3":
        hf.update(
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=c.scale**-2,
            layer_types=_layer_types(c),
            rope_local_base_freq=c.rope_local_theta,
            final_logit_softcapping=c.final_logit_softcapping,
        )
    return hf


def _layer_types(c: ModelConfig) -> list[str]:
    return ["sliding_attention" if c.is_sliding(i) else "full_attention" for i in range(c.num_layers)]


def _write_tokenizer(package: ModelPackage, directory: Path) -> None:
    tokenizer = package.tokenizer
    tokenizer.backend.save(str(directory / "tokenizer.json"))
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "add_bos_token": tokenizer.add_bos,
        "add_eos_token": tokenizer.add_eos,
        "clean_up_tokenization_spaces": False,
    }
    pad = tokenizer.id_to_token(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else None
    if pad is not None:
        config["pad_token"] = pad
    if tokenizer.chat_template is not None:
        config["chat_template"] = tokenizer.chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters being trained, by name (what a checkpoint must keep)."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
