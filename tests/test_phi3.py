"""Phi-3: fused q/k/v and gate/up, LongRoPE on both sides of the original context, GGUF files
with llama.cpp's names, refusals, and a full fine-tune written back in Phi-3's own layout.
Logits and greedy tokens of whole prompts against transformers: test_parity.py (phi3, phi3_longrope)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nanoinfer import LLM, SamplingParams
from nanoinfer.errors import ModelLoadError

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def test_longrope_short_factors_within_the_original_context(tiny_model):
    """A 20-token prompt stays inside the original 24 positions: the short factors, as transformers."""
    path, hf = tiny_model("phi3_longrope")
    ids = list(range(3, 23))
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
    got = LLM(str(path), dtype="float32").engine.model.score(ids)
    assert torch.allclose(got, want, atol=1e-4)


def test_partial_rotary_is_refused(tiny_model, tmp_path):
    path, _ = tiny_model("phi3")
    config = json.loads((path / "config.json").read_text())
    config["partial_rotary_factor"] = 0.75
    (tmp_path / "config.json").write_text(json.dumps(config))
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((path / name).read_bytes())
    with pytest.raises(ModelLoadError, match="partial_rotary_factor 0.75"):
        LLM(str(tmp_path))


def _write_gguf(model, path) -> None:
    """The HF Phi-3 as llama.cpp's converter writes it: attn_qkv and ffn_up fused, LongRoPE
    factors as tensors, no q/k permutation (Phi-3 rotates halves, as HF does)."""
    from hf_to_gguf import common_tensors, finish, hf_state, open_writer

    c, state = model.config, hf_state(model)
    tensors = common_tensors(state, c.num_hidden_layers)
    for i in range(c.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        tensors[b + "attn_qkv.weight"] = state[p + "self_attn.qkv_proj.weight"]
        tensors[b + "attn_output.weight"] = state[p + "self_attn.o_proj.weight"]
        tensors[b + "ffn_up.weight"] = state[p + "mlp.gate_up_proj.weight"]
        tensors[b + "ffn_down.weight"] = state[p + "mlp.down_proj.weight"]
    rope = c.rope_parameters
    tensors["rope_factors_long.weight"] = np.array(rope["long_factor"], dtype=np.float32)
    tensors["rope_factors_short.weight"] = np.array(rope["short_factor"], dtype=np.float32)
    w = open_writer(path, "phi3", c)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    finish(w, tensors, c.vocab_size)


def test_gguf_phi3_matches_transformers(tiny_model, tmp_path):
    _, hf = tiny_model("phi3_longrope")
    path = tmp_path / "phi3.gguf"
    _write_gguf(hf, path)
    llm = LLM(str(path), dtype="float32", quantization="none")
    assert llm.engine.model_config.rope_scaling["rope_type"] == "longrope"
    for ids in (list(range(5, 37)), list(range(5, 20))):  # past the original 24 positions, and within
        with torch.no_grad():
            want = hf(torch.tensor([ids])).logits[0]
        assert torch.allclose(llm.engine.model.score(ids), want, atol=1e-4)
    ids = list(range(5, 37))
    expected = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids) :].tolist()
    assert llm.generate([ids], GREEDY)[0].token_ids == expected


def test_early_phi3_configs_name_longrope_su():
    from nanoinfer.config import ModelConfig

    hf = {"model_type": "phi3", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 128}
    hf |= {"num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 256}
    hf |= {"original_max_position_embeddings": 24, "rope_scaling": {"type": "su", "short_factor": [1.0] * 8}}
    hf["rope_scaling"]["long_factor"] = [2.0] * 8
    scaling = ModelConfig.from_hf(hf).rope_scaling
    assert scaling["rope_type"] == "longrope" and scaling["original_max_position_embeddings"] == 24
