"""Loading transformers-format directories: name mapping, shards, dtypes, generation defaults, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import build_hf_model, save_case

from nanoinfer.config import ModelConfig
from nanoinfer.errors import ModelLoadError
from nanoinfer.loading.hf import expected_shapes, load_hf_dir, load_hf_weights


def _copy(src: Path, dst: Path) -> Path:
    """A private copy of a cached tiny model directory that a test may damage."""
    return Path(shutil.copytree(src, dst / "model"))


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def _config(path: Path) -> ModelConfig:
    return ModelConfig.from_hf(json.loads((path / "config.json").read_text()))


def _load_error(path: Path, **kwargs) -> str:
    """Message of the ModelLoadError that loading path raises; it must be one line."""
    with pytest.raises(ModelLoadError) as info:
        load_hf_dir(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---- name mapping ------------------------------------------------------------------------------


def test_llama_style_names_map_onto_canonical_weights(tiny_model) -> None:
    path, hf = tiny_model("qwen2")
    config = _config(path)
    weights = load_hf_weights(path, config)
    assert set(weights) == set(expected_shapes(config))
    sd = hf.state_dict()
    pairs = {
        "embed.weight": "model.embed_tokens.weight",
        "layers.1.input_norm.weight": "model.layers.1.input_layernorm.weight",
        "layers.1.pre_mlp_norm.weight": "model.layers.1.post_attention_layernorm.weight",
        "layers.0.attn.k_proj.bias": "model.layers.0.self_attn.k_proj.bias",
        "layers.0.mlp.down_proj.weight": "model.layers.0.mlp.down_proj.weight",
        "norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
    }
    for canonical, hf_name in pairs.items():
        assert torch.equal(weights[canonical], sd[hf_name]), canonical


def test_gemma3_norms_map_by_role_and_embeddings_tie(tiny_model) -> None:
    path, hf = tiny_model("gemma3")
    config = _config(path)
    weights = load_hf_weights(path, config)
    assert set(weights) == set(expected_shapes(config))
    assert "lm_head.weight" not in weights
    sd, layer = hf.state_dict(), "model.layers.2."
    # gemma3's post_attention_layernorm normalizes the attention output, not the MLP input
    assert torch.equal(weights["layers.2.post_attn_norm.weight"], sd[layer + "post_attention_layernorm.weight"])
    assert torch.equal(weights["layers.2.pre_mlp_norm.weight"], sd[layer + "pre_feedforward_layernorm.weight"])
    assert torch.equal(weights["layers.2.post_mlp_norm.weight"], sd[layer + "post_feedforward_layernorm.weight"])
    assert torch.equal(weights["layers.2.attn.q_norm.weight"], sd[layer + "self_attn.q_norm.weight"])


def test_multimodal_gemma3_checkpoint_loads_its_text_model(tiny_model, tmp_path: Path) -> None:
    path, _ = tiny_model("gemma3")
    model = _copy(path, tmp_path)
    # Gemma3ForConditionalGeneration layout: config under text_config, names under model.language_model.
    text_config = json.loads((model / "config.json").read_text())
    wrapper = {"model_type": "gemma3", "text_config": text_config, "vision_config": {}, "eos_token_id": [2, 3]}
    (model / "config.json").write_text(json.dumps(wrapper))
    tensors = load_file(model / "model.safetensors")
    renamed = {name.replace("model.", "model.language_model.", 1): t for name, t in tensors.items()}
    renamed["model.vision_tower.patch.weight"] = torch.zeros(2, 2)  # ignored, not an error
    save_file(renamed, model / "model.safetensors")
    (model / "generation_config.json").unlink()
    package = load_hf_dir(model)
    assert package.config == _config(path)
    assert torch.equal(package.weights["embed.weight"], tensors["model.embed_tokens.weight"])
    assert package.generation.eos_token_ids == (2, 3)


def test_config_reads_transformers5_rope_layout(tiny_model) -> None:
    gemma = _config(tiny_model("gemma3")[0])
    assert (gemma.rope_theta, gemma.rope_local_theta) == (1_000_000.0, 5_000.0)
    assert gemma.layer_types == ("sliding", "sliding", "full") and gemma.sliding_window == 8
    assert gemma.scale == pytest.approx(24**-0.5)
    yarn = _config(tiny_model("yarn_rope")[0]).rope_scaling
    assert yarn == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}


# ---- shards and dtypes -------------------------------------------------------------------------


def test_sharded_checkpoint_loads_like_single_file(tiny_model, tiny_tokenizer, tmp_path: Path) -> None:
    path, hf = tiny_model("llama")
    sharded = save_case(hf, tiny_tokenizer, tmp_path / "sharded", max_shard_size="40KB")
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 1 and (sharded / "model.safetensors.index.json").is_file()
    config = _config(path)
    single, split = load_hf_weights(path, config), load_hf_weights(sharded, config)
    assert set(single) == set(split)
    assert all(torch.equal(single[name], split[name]) for name in single)


def test_missing_shard_is_named(tiny_model, tiny_tokenizer, tmp_path: Path) -> None:
    _, hf = tiny_model("llama")
    sharded = save_case(hf, tiny_tokenizer, tmp_path / "sharded", max_shard_size="40KB")
    victim = sorted(sharded.glob("*.safetensors"))[-1]
    victim.unlink()
    assert victim.name in _load_error(sharded)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, "bfloat16"])
def test_dtype_selection_casts_every_weight(tiny_model, dtype) -> None:
    path, _ = tiny_model("llama")
    want = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    package = load_hf_dir(path, dtype=dtype)
    assert {t.dtype for t in package.weights.values()} == {want}


def test_bf16_checkpoint_keeps_its_dtype_by_default(tiny_tokenizer, tmp_path: Path) -> None:
    hf = build_hf_model("llama").to(torch.bfloat16)
    path = save_case(hf, tiny_tokenizer, tmp_path / "bf16")
    config = _config(path)
    assert config.torch_dtype == "bfloat16"
    weights = load_hf_weights(path, config)
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert torch.equal(weights["embed.weight"], hf.model.embed_tokens.weight)


# ---- generation defaults -----------------------------------------------------------------------


def test_generation_config_defaults(tiny_model, tmp_path: Path) -> None:
    model = _copy(tiny_model("llama")[0], tmp_path)
    gen = {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 20, "eos_token_id": [2, 3]}
    (model / "generation_config.json").write_text(json.dumps(gen))
    defaults = load_hf_dir(model).generation
    assert (defaults.temperature, defaults.top_p, defaults.top_k) == (0.7, 0.9, 20)
    assert defaults.eos_token_ids == (2, 3)


def test_eos_falls_back_to_config_then_tokenizer(tiny_model, tmp_path: Path) -> None:
    model = _copy(tiny_model("llama")[0], tmp_path)
    (model / "generation_config.json").unlink()
    _edit_json(model / "config.json", eos_token_id=3)
    assert load_hf_dir(model).generation.eos_token_ids == (3,)
    _edit_json(model / "config.json", eos_token_id=None)
    assert load_hf_dir(model).generation.eos_token_ids == (2,)  # the tokenizer's <|im_end|>


# ---- errors ------------------------------------------------------------------------------------


def test_directory_without_config(tiny_model, tmp_path: Path) -> None:
    model = _copy(tiny_model("llama")[0], tmp_path)
    (model / "config.json").unlink()
    assert "config.json" in _load_error(model)


def test_path_that_is_not_a_directory(tmp_path: Path) -> None:
    assert "not a directory" in _load_error(tmp_path / "nope")


def test_directory_without_weights(tiny_model, tmp_path: Path) -> None:
    model = _copy(tiny_model("llama")[0], tmp_path)
    (model / "model.safetensors").unlink()
    assert "model.safetensors" in _load_error(model)


@pytest.mark.parametrize("damage", ["truncate", "garbage_header"])
def test_corrupt_safetensors(tiny_model, tmp_path: Path, damage: str) -> None:
    model = _copy(tiny_model("llama")[0], tmp_path)
    file = model / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 64 + data[64:])
    assert "model.safetensors" in _load_error(model)


def test_missing_tensor_is_named(tiny_model, tmp_path: Path) -> None:
    model = _copy(tiny_model("llama")[0], tmp_path)
    tensors = load_file(model / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, model / "model.safetensors")
    assert "model.layers.1.mlp.up_proj.weight" in _load_error(model)


def test_shape_disagreeing_with_config_is_named(tiny_model, tmp_path: Path) -> None:
    model = _copy(tiny_model("llama")[0], tmp_path)
    _edit_json(model / "config.json", intermediate_size=96)
    message = _load_error(model)
    assert "mlp.gate_proj.weight" in message
    assert "[128, 64]" in message and "[96, 64]" in message


def test_unsupported_model_type(tiny_model, tmp_path: Path) -> None:
    model = _copy(tiny_model("llama")[0], tmp_path)
    _edit_json(model / "config.json", model_type="gpt2")
    message = _load_error(model)
    assert "gpt2" in message and "llama" in message
