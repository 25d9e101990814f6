"""Multi-head latent attention (DeepSeek-V2/V3): the cache holds one latent row per token, decode
never builds per-head K/V, and batching, prefix caching, chunked prefill and preemption keep the
answers. Logits and greedy tokens against transformers: test_parity.py (deepseek_* cases)."""

from __future__ import annotations

import pytest
import torch

from nanoinfer import LLM, SamplingParams
from nanoinfer.config import ModelConfig
from nanoinfer.model.kv_cache import kv_bytes_per_token
from nanoinfer.model.mla import MLAttention

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = [[3 + (7 * i + j) % 290 for j in range(10 + 9 * i)] for i in range(4)]

# DeepSeek-V2-Lite's config.json, the fields that size its cache
V2_LITE = {
    "model_type": "deepseek_v2",
    "vocab_size": 102400,
    "hidden_size": 2048,
    "intermediate_size": 10944,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "kv_lora_rank": 512,
    "q_lora_rank": None,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "num_experts_per_tok": 6,
    "first_k_dense_replace": 1,
    "topk_method": "greedy",
    "max_position_embeddings": 163840,
}


def test_the_cache_holds_the_latent_not_per_head_k_and_v():
    config = ModelConfig.from_hf(V2_LITE)
    assert config.kv_values_per_token == 512 + 64 == 576
    assert kv_bytes_per_token(config, torch.float16) == 27 * 576 * 2
    # the same model with an ordinary cache: K and V of every head, 192 wide (V padded from 128)
    full = config.replace(kv_lora_rank=0, num_kv_heads=16, head_dim=192)
    assert kv_bytes_per_token(full, torch.float16) == 27 * 2 * 16 * 192 * 2


@pytest.mark.parametrize("case_id", ["deepseek_v2", "deepseek_v3"])
def test_latent_cache_shapes_and_absorbed_decode(tiny_model, case_id, monkeypatch):
    path, _ = tiny_model(case_id)
    llm = LLM(str(path), dtype="float32")
    kv, config = llm.engine.runner.kv_cache, llm.engine.model_config
    assert config.is_mla and config.head_dim == 32 + 8 and config.num_kv_heads == 1
    assert kv.k[0].shape[1:] == (1, kv.block_size, 40) and kv.v[0].shape[-1] == 0
    calls = []
    monkeypatch.setattr(torch.nn.Linear, "forward", _spy(torch.nn.Linear.forward, calls))
    llm.generate(PROMPTS[:2], GREEDY)
    kv_b = {id(layer.attn.kv_b_proj) for layer in llm.engine.model.decoder_layers}
    assert calls and not any(id(module) in kv_b for module, _ in calls), "the latent was expanded to per-head K/V"


def _spy(real, calls):
    def forward(self, x):
        calls.append((self, x.reshape(-1, x.shape[-1]).shape[0]))
        return real(self, x)

    return forward


@pytest.mark.parametrize("case_id", ["deepseek_v2", "deepseek_v3"])
def test_batching_prefix_cache_chunking_and_preemption_keep_answers(tiny_model, case_id):
    path, _ = tiny_model(case_id)
    alone = [LLM(str(path), dtype="float32").generate([p], GREEDY)[0].token_ids for p in PROMPTS]
    llm = LLM(str(path), dtype="float32", block_size=16, prefix_page_size=8)
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == alone
    again = llm.generate(PROMPTS, GREEDY)  # the prompts are cached now
    assert [o.token_ids for o in again] == alone and again[-1].num_cached_tokens > 0
    chunked = LLM(str(path), dtype="float32", max_num_batched_tokens=16, enable_prefix_cache=False)
    assert [o.token_ids for o in chunked.generate(PROMPTS, GREEDY)] == alone
    six_blocks = 6 * 16 * kv_bytes_per_token(llm.engine.model_config, torch.float32)  # less than all four need
    tight = LLM(str(path), dtype="float32", kv_cache_dtype="float32", block_size=16, kv_cache_memory=six_blocks)
    assert [o.token_ids for o in tight.generate(PROMPTS, GREEDY)] == alone
    assert tight.engine.metrics.registry.get_sample_value("nanoinfer:num_preemptions_total") > 0
    for engine in (llm, chunked, tight):
        engine.engine.check_integrity()


def test_mla_layers_are_mlattention(tiny_model):
    path, _ = tiny_model("deepseek_v3")
    model = LLM(str(path), dtype="float32").engine.model
    assert all(isinstance(layer.attn, MLAttention) for layer in model.decoder_layers)


def test_inspect_writes_out_the_latent_cache_formula(tiny_model):
    import subprocess
    import sys

    path, _ = tiny_model("deepseek_v2")
    out = subprocess.run(
        [sys.executable, "-m", "nanoinfer.cli", "inspect", "--model", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "KV cache per token = 2 layers x (32 kv_lora_rank + 8 qk_rope_head_dim) x bytes" in out.stdout
    assert "float16: 160 bytes" in out.stdout  # 2 x 40 x 2
    assert "4 heads x (24 + 16) = 160 values per layer against 40: 4.0x more" in out.stdout


def test_lora_on_latent_attention_projections_is_refused(tiny_model):
    from nanoinfer.loading import load_package
    from nanoinfer.model.lora import LoRASpec, apply_lora
    from nanoinfer.model.transformer import Transformer

    path, _ = tiny_model("deepseek_v2")
    model = Transformer.from_package(load_package(str(path)), torch.float32)
    with pytest.raises(ValueError, match="multi-head latent attention"):
        apply_lora(model, model.config, LoRASpec(4, 8, ("q_proj",)))


@pytest.mark.parametrize("case_id", ["deepseek_v2", "deepseek_v3"])
def test_torch_attention_path_equals_the_kernel_path(tiny_model, case_id, monkeypatch):
    """Off our C kernels (other dtypes, other devices) MLA attends in torch ops: same answers."""
    from nanoinfer.model import mla

    path, _ = tiny_model(case_id)
    llm = LLM(str(path), dtype="float32", enable_prefix_cache=False)
    ids = PROMPTS[2]
    kernel_logits = llm.engine.model.score(ids)
    kernel_answers = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    monkeypatch.setattr(mla, "kernels", lambda: None)
    assert torch.allclose(llm.engine.model.score(ids), kernel_logits, atol=1e-4)
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == kernel_answers


# ---- GGUF files with llama.cpp's deepseek2 names -----------------------------------------------


def _write_deepseek2_gguf(model, path, split_kv_b: bool) -> None:
    """The HF DeepSeek model as llama.cpp's converter writes it: arch deepseek2, experts stacked,
    shared experts as *_shexp, the correction bias as exp_probs_b; kv_b whole (older files) or
    split per head into k_b (transposed) and v_b (newer files, which describe MLA's head sizes
    in key/value_length_mla)."""
    import gguf
    from hf_to_gguf import common_tensors, finish, hf_state, open_writer, stacked_experts

    c, state = model.config, hf_state(model)
    nope, rope, v_dim, rank, H = (
        c.qk_nope_head_dim,
        c.qk_rope_head_dim,
        c.v_head_dim,
        c.kv_lora_rank,
        c.num_attention_heads,
    )
    tensors = common_tensors(state, c.num_hidden_layers)
    names = {"q_proj": "attn_q", "q_a_proj": "attn_q_a", "q_a_layernorm": "attn_q_a_norm", "q_b_proj": "attn_q_b"}
    names |= {"kv_a_proj_with_mqa": "attn_kv_a_mqa", "kv_a_layernorm": "attn_kv_a_norm", "o_proj": "attn_output"}
    for i in range(c.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        for hf, ours in names.items():
            if p + f"self_attn.{hf}.weight" in state:
                tensors[b + f"{ours}.weight"] = state[p + f"self_attn.{hf}.weight"]
        kv_b = state[p + "self_attn.kv_b_proj.weight"]
        if split_kv_b:
            per_head = kv_b.reshape(H, nope + v_dim, rank)
            tensors[b + "attn_k_b.weight"] = per_head[:, :nope].transpose(0, 2, 1)
            tensors[b + "attn_v_b.weight"] = per_head[:, nope:]
        else:
            tensors[b + "attn_kv_b.weight"] = kv_b
        if p + "mlp.gate_proj.weight" in state:  # the leading dense layer
            for part in ("gate", "up", "down"):
                tensors[b + f"ffn_{part}.weight"] = state[p + f"mlp.{part}_proj.weight"]
            continue
        tensors |= stacked_experts(state, i)
        if p + "mlp.gate.e_score_correction_bias" in state:
            tensors[b + "exp_probs_b.bias"] = state[p + "mlp.gate.e_score_correction_bias"]
        for part in ("gate", "up", "down"):
            tensors[b + f"ffn_{part}_shexp.weight"] = state[p + f"mlp.shared_experts.{part}_proj.weight"]
    sigmoid = c.model_type == "deepseek_v3"
    w = open_writer(path, "deepseek2", c, head_count_kv=1 if split_kv_b else H)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(rope)
    w.add_kv_lora_rank(rank)
    if c.q_lora_rank:
        w.add_q_lora_rank(c.q_lora_rank)
    if split_kv_b:  # newer files: the latent as one head, MLA's head sizes apart
        w.add_key_length(rank + rope)
        w.add_value_length(rank)
        w.add_key_length_mla(nope + rope)
        w.add_value_length_mla(v_dim)
    else:
        w.add_key_length(nope + rope)
        w.add_value_length(v_dim)
    w.add_leading_dense_block_count(c.first_k_dense_replace)
    w.add_expert_count(c.n_routed_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_expert_shared_count(c.n_shared_experts)
    w.add_expert_feed_forward_length(c.moe_intermediate_size)
    w.add_expert_weights_scale(c.routed_scaling_factor)
    w.add_expert_weights_norm(bool(sigmoid and c.norm_topk_prob))
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if sigmoid else gguf.ExpertGatingFuncType.SOFTMAX)
    w.add_expert_group_count(c.n_group)
    w.add_expert_group_used_count(c.topk_group)
    yarn = c.rope_parameters if c.rope_parameters.get("rope_type") == "yarn" else None
    if yarn is not None:  # as llama.cpp's converter writes DeepSeek's yarn
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(yarn["factor"])
        w.add_rope_scaling_orig_ctx_len(yarn["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_log_mul(0.1 * yarn["mscale_all_dim"])
    finish(w, tensors, c.vocab_size)


@pytest.mark.parametrize("case_id", ["deepseek_v2", "deepseek_v3", "deepseek_v2_yarn"])
@pytest.mark.parametrize("split_kv_b", [False, True])
def test_gguf_deepseek2_matches_transformers(tiny_model, tmp_path, case_id, split_kv_b):
    _, hf = tiny_model(case_id)
    path = tmp_path / f"{case_id}.gguf"
    _write_deepseek2_gguf(hf, path, split_kv_b)
    llm = LLM(str(path), dtype="float32", quantization="none")
    config = llm.engine.model_config
    assert config.architecture == case_id.removesuffix("_yarn") and config.is_mla and config.head_dim == 40
    ids = list(range(5, 37))
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
    assert torch.allclose(llm.engine.model.score(ids), want, atol=1e-4)
    expected = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids) :].tolist()
    assert llm.generate([ids], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].token_ids == expected


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_query_and_latent_projections_quantize_and_kv_b_stays_float(tiny_model, method):
    """Weight-only quantization covers MLA's q_a/q_b (or q) and kv_a projections like every other
    projection; kv_b_proj stays float, since the absorbed attention folds its weight into the
    queries and outputs. The quantized model stays near the float one (this random tiny model's
    logits are flat, so the bound is loose: about 0.10 relative error for int8, 0.23 for int4,
    against about 1 for a broken scale)."""
    from torch import nn

    from nanoinfer.quant import Int4Linear, Int8Linear

    path = str(tiny_model("deepseek_v3")[0])  # q_lora_rank set: q_a -> norm -> q_b
    quantized = LLM(path, dtype="float32", quantization=method)
    attn = quantized.engine.model.decoder_layers[0].attn
    assert isinstance(attn, MLAttention)
    kind = Int4Linear if method == "int4" else Int8Linear
    for module in (attn.q_a_proj, attn.q_b_proj, attn.kv_a_proj):
        base = getattr(module, "quantized", module)  # large-batch wrappers keep the quantized module inside
        assert isinstance(base, kind), type(module)
    assert type(attn.kv_b_proj) is nn.Linear
    ids = list(range(5, 37))
    ref = LLM(path, dtype="float32", quantization="none").engine.model.score(ids)
    got = quantized.engine.model.score(ids)
    assert (got - ref).norm() / ref.norm() < (0.15 if method == "int8" else 0.35)
