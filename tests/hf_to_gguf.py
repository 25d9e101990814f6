"""Tiny transformers models written as llama.cpp's converter would: the parts every test GGUF
shares (the writer with the common metadata, the global and norm tensors, stacked experts, a
placeholder vocabulary), so each test writes only what its architecture does differently."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def hf_state(model: Any) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def common_tensors(state: dict[str, np.ndarray], num_layers: int) -> dict[str, np.ndarray]:
    """Embedding, final norm, LM head, and each layer's two norms under GGUF names."""
    tensors = {
        "token_embd.weight": state["model.embed_tokens.weight"],
        "output_norm.weight": state["model.norm.weight"],
        "output.weight": state["lm_head.weight"],
    }
    for i in range(num_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        tensors[b + "attn_norm.weight"] = state[p + "input_layernorm.weight"]
        tensors[b + "ffn_norm.weight"] = state[p + "post_attention_layernorm.weight"]
    return tensors


def stacked_experts(state: dict[str, np.ndarray], layer: int) -> dict[str, np.ndarray]:
    """The router and the experts of one MoE layer; in memory transformers 5 keeps experts
    stacked: gate_up [E, 2I, H] (gate first), down [E, H, I]."""
    p, b = f"model.layers.{layer}.", f"blk.{layer}."
    gate_up = state[p + "mlp.experts.gate_up_proj"]
    half = gate_up.shape[1] // 2
    return {
        b + "ffn_gate_inp.weight": state[p + "mlp.gate.weight"],
        b + "ffn_gate_exps.weight": gate_up[:, :half],
        b + "ffn_up_exps.weight": gate_up[:, half:],
        b + "ffn_down_exps.weight": state[p + "mlp.experts.down_proj"],
    }


def open_writer(path: Path, arch: str, config: Any, head_count_kv: int | None = None) -> Any:
    """A GGUFWriter with the sizes every architecture states."""
    import gguf

    c = config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads if head_count_kv is None else head_count_kv)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    return w


def finish(w: Any, tensors: dict[str, np.ndarray], vocab_size: int) -> None:
    """A placeholder vocabulary of vocab_size tokens, the tensors as float32, and the file."""
    vocab = [f"<t{i}>" for i in range(vocab_size)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab)
    w.add_token_types([1] * len(vocab))
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, value in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(value.astype(np.float32)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
