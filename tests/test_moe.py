"""Mixture of experts (qwen3_moe, mixtral): tokens grouped by expert, quantized experts, the load
statistics in /metrics and `nanoinfer inspect`, LoRA refused on experts, the training path.
Logits and greedy tokens against transformers are in test_parity.py (cases qwen3_moe, mixtral)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from nanoinfer import LLM, SamplingParams
from nanoinfer.engine.metrics import expert_load
from nanoinfer.errors import RequestError
from nanoinfer.model.layers import MLP
from nanoinfer.model.moe import SparseMoE
from nanoinfer.quant.int4 import Int4Linear
from nanoinfer.quant.int8 import Int8Linear

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = [[5 + i, 17, 33, 40, 2 + 3 * i, 99, 120 + i, 7] for i in range(4)]


def test_each_expert_runs_once_per_step_over_its_tokens(tiny_model, monkeypatch):
    """Grouped by expert: one MLP call per expert that has tokens, whatever the batch size."""
    path, _ = tiny_model("qwen3_moe")
    llm = LLM(str(path), dtype="float32")
    calls: list[int] = []
    real = MLP.forward

    def spy(self, x):
        calls.append(x.shape[0])
        return real(self, x)

    monkeypatch.setattr(MLP, "forward", spy)
    llm.engine.model.score(list(range(3, 40)))  # 37 tokens through one forward
    config = llm.engine.model_config
    moe_layers = [i for i in range(config.num_layers) if config.is_moe_layer(i)]
    dense_calls = config.num_layers - len(moe_layers)
    assert len(calls) - dense_calls <= config.num_experts * len(moe_layers)
    assert sum(calls) == 37 * dense_calls + 37 * config.num_experts_per_tok * len(moe_layers)


@pytest.mark.parametrize("case_id", ["qwen3_moe", "mixtral"])
def test_expert_load_is_counted_and_exported(tiny_model, case_id):
    path, _ = tiny_model(case_id)
    llm = LLM(str(path), dtype="float32", enable_prefix_cache=False)
    outs = llm.generate(PROMPTS, GREEDY)
    forwarded = sum(len(p) for p in PROMPTS) + sum(len(o.token_ids) - 1 for o in outs)  # the last token is not fed
    config = llm.engine.model_config
    load = expert_load(llm.engine.model)
    assert sorted(load) == [i for i in range(config.num_layers) if config.is_moe_layer(i)]
    for counts in load.values():
        assert sum(counts) == forwarded * config.num_experts_per_tok
    registry = llm.engine.metrics.registry
    layer = next(iter(load))
    for expert, tokens in enumerate(load[layer]):
        labels = {"layer": str(layer), "expert": str(expert)}
        assert registry.get_sample_value("nanoinfer:moe_expert_tokens_total", labels) == tokens


def test_dense_models_export_no_expert_load(tiny_model):
    path, _ = tiny_model("qwen3")
    llm = LLM(str(path))
    llm.generate(PROMPTS[:1], GREEDY)
    assert llm.engine.metrics.registry.get_sample_value("nanoinfer:moe_expert_tokens_total", {"layer": "0"}) is None


@pytest.mark.parametrize("method, linear", [("int8", Int8Linear), ("int4", Int4Linear)])
def test_experts_are_quantized_like_dense_layers(tiny_model, method, linear):
    path, _ = tiny_model("mixtral")
    exact = LLM(str(path), dtype="float32")
    quantized = LLM(str(path), dtype="float32", quantization=method)
    moe = next(layer.mlp for layer in quantized.engine.model.decoder_layers if isinstance(layer.mlp, SparseMoE))
    assert all(isinstance(e.gate_up_proj, linear) and isinstance(e.down_proj, linear) for e in moe.experts)
    assert not isinstance(moe.router, linear) and moe.router.weight.dtype == torch.float32
    ids = PROMPTS[0] + PROMPTS[1]
    want, got = exact.engine.model.score(ids), quantized.engine.model.score(ids)
    agreement = (want.argmax(-1) == got.argmax(-1)).float().mean().item()
    assert agreement >= (0.9 if method == "int8" else 0.6), agreement


def test_inspect_shows_expert_load_on_a_prompt(tiny_model):
    path, _ = tiny_model("qwen3_moe")
    out = subprocess.run(
        [sys.executable, "-m", "nanoinfer.cli", "inspect", "--model", str(path), "--tokens", "The quick brown fox"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "expert load (tokens per expert; each token picks 2 of 8)" in out.stdout
    assert "layer   0:" in out.stdout and "layer   1:" not in out.stdout  # layer 1 is dense (mlp_only_layers)


def test_lora_on_experts_is_refused(tiny_model, tmp_path):
    from nanoinfer.model.lora import LoRASpec, apply_lora
    from nanoinfer.model.transformer import Transformer

    path, _ = tiny_model("mixtral")
    from nanoinfer.loading import load_package

    model = Transformer.from_package(load_package(str(path)), torch.float32)
    with pytest.raises(ValueError, match="mixture of experts"):
        apply_lora(model, model.config, LoRASpec(4, 8, ("q_proj", "gate_proj")))
    apply_lora(model, model.config, LoRASpec(4, 8, ("q_proj", "v_proj")))  # attention is fine


def test_served_adapter_on_experts_is_a_request_error(tiny_model, tmp_path):
    from nanoinfer import LoRARequest
    from nanoinfer.adapters.peft_files import save_adapter
    from nanoinfer.loading import load_package
    from nanoinfer.model.lora import LoRASpec, apply_lora
    from nanoinfer.model.transformer import Transformer

    dense_path, _ = tiny_model("llama")  # an adapter made for a dense model of the same sizes
    dense = Transformer.from_package(load_package(str(dense_path)), torch.float32)
    spec = LoRASpec(4, 8, ("down_proj",))
    save_adapter(apply_lora(dense, dense.config, spec), spec, tmp_path / "a", "llama")
    path, _ = tiny_model("mixtral")
    llm = LLM(str(path), dtype="float32", enable_lora=True)
    with pytest.raises(RequestError, match="mixture of experts"):
        llm.generate(PROMPTS[:1], GREEDY, lora_request=LoRARequest("a", 1, str(tmp_path / "a")))
    llm.engine.check_integrity()


# ---- GGUF files with llama.cpp's names for MoE -------------------------------------------------


def _write_gguf(model, path, arch: str) -> None:
    """The HF model `model` as llama.cpp's converter would write it: experts stacked [E, out, in],
    the router as ffn_gate_inp, llama q/k rows permuted (Mixtral is arch llama with experts)."""
    from hf_to_gguf import common_tensors, finish, hf_state, open_writer, stacked_experts
    from test_gguf import _permute

    c, state = model.config, hf_state(model)
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
    names |= {"q_norm": "attn_q_norm", "k_norm": "attn_k_norm"}
    tensors = common_tensors(state, c.num_hidden_layers)
    for i in range(c.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        for ours, theirs in names.items():
            if p + f"self_attn.{ours}.weight" in state:
                w = state[p + f"self_attn.{ours}.weight"]
                if arch == "llama" and ours in ("q_proj", "k_proj"):
                    w = _permute(w, c.num_attention_heads if ours == "q_proj" else c.num_key_value_heads)
                tensors[b + f"{theirs}.weight"] = w
        tensors |= stacked_experts(state, i)
    w = open_writer(path, arch, c)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_expert_count(c.num_local_experts if arch == "llama" else c.num_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    if arch == "qwen3moe":
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
    finish(w, tensors, c.vocab_size)


@pytest.mark.parametrize(
    "case_id, arch, extra",
    [
        (
            "qwen3_moe",
            "qwen3moe",
            {"mlp_only_layers": [], "norm_topk_prob": True},
        ),  # llama.cpp: all sparse, renormalized
        ("mixtral", "llama", {}),
    ],
)
def test_gguf_moe_matches_transformers(tmp_path, case_id, arch, extra):
    from tiny_models import build_hf_model

    hf = build_hf_model(case_id, **extra)
    path = tmp_path / f"{case_id}.gguf"
    _write_gguf(hf, path, arch)
    llm = LLM(str(path), dtype="float32", quantization="none")
    assert llm.engine.model_config.architecture == case_id and llm.engine.model_config.num_experts
    ids = list(range(5, 37))
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
    assert torch.allclose(llm.engine.model.score(ids), want, atol=1e-4)
    greedy = llm.generate([ids, ids[:9]], GREEDY)
    for prompt, out in zip([ids, ids[:9]], greedy):
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt) :].tolist()
        assert out.token_ids == expected


def test_int4_experts_run_in_one_c_call_with_the_same_answers(tiny_model, monkeypatch):
    """With every expert int4 on our kernels a MoE layer is one C call (moe_experts); its logits
    equal the expert-by-expert path's, and greedy answers agree alone and batched."""
    path, _ = tiny_model("qwen3_moe")
    llm = LLM(str(path), dtype="float32", quantization="int4", enable_prefix_cache=False)
    moe = next(layer.mlp for layer in llm.engine.model.decoder_layers if isinstance(layer.mlp, SparseMoE))
    ids = PROMPTS[0] + PROMPTS[1]
    fused_logits = llm.engine.model.score(ids)
    fused = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    assert moe._tables is not None, "the C path did not run"
    monkeypatch.setattr(SparseMoE, "_c_tables", lambda self, x: None)
    assert torch.allclose(llm.engine.model.score(ids), fused_logits, atol=1e-5)
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == fused


@pytest.mark.parametrize("case_id", ["qwen3_moe", "mixtral"])
def test_moe_layers_decode_in_the_fused_c_stack(tiny_model, monkeypatch, case_id):
    """Decode steps of an int4 MoE run every layer, router and experts included, in the one C
    call of the fused stack: the same tokens and logprobs as the layer-by-layer path, alone and
    batched, and the same expert load counted."""
    from nanoinfer.kernels import CpuKernels

    path, _ = tiny_model(case_id)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3)

    def run() -> tuple[list, dict]:
        llm = LLM(str(path), dtype="float32", quantization="int4", enable_prefix_cache=False)
        outs = [o.outputs[0] for o in llm.generate(PROMPTS, params)]
        alone = llm.generate([PROMPTS[2]], params)[0].outputs[0]
        assert alone.token_ids == outs[2].token_ids
        return outs, expert_load(llm.engine.model)

    calls = []
    original = CpuKernels.decode_layers
    monkeypatch.setattr(CpuKernels, "decode_layers", lambda self, *a: calls.append(1) or original(self, *a))
    fused, fused_load = run()
    assert calls, "the fused stack did not run"
    monkeypatch.setattr(SparseMoE, "decode_description", lambda self: None)  # layer by layer
    calls.clear()
    stepwise, stepwise_load = run()
    assert not calls
    assert [o.token_ids for o in fused] == [o.token_ids for o in stepwise]
    for a, b in zip(fused, stepwise):
        for step_a, step_b in zip(a.logprobs, b.logprobs):
            assert step_a.keys() == step_b.keys()
            assert all(abs(step_a[t] - step_b[t]) < 1e-4 for t in step_a)
    assert fused_load == stepwise_load


# ---- DeepSeek's routing: module against transformers' (the model itself needs MLA, not built) ----


def _our_moe_like(hf_moe, **routing) -> SparseMoE:
    """Our SparseMoE with `hf_moe`'s weights (experts stacked [E, 2I, H] in transformers 5)."""
    from nanoinfer.config import ModelConfig

    experts = hf_moe.experts.gate_up_proj.shape[0]
    width = hf_moe.experts.down_proj.shape[2]
    config = ModelConfig(
        architecture="qwen3_moe",  # a label only: the routing fields below are what is tested
        vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4, num_kv_heads=4,
        head_dim=16, max_position_embeddings=64, num_experts=experts, num_experts_per_tok=2,
        moe_intermediate_size=width, **routing,
    )  # fmt: skip
    ours = SparseMoE(config)
    with torch.no_grad():
        ours.router.weight.copy_(hf_moe.gate.weight)
        if ours.router.correction_bias is not None:
            ours.router.correction_bias.copy_(hf_moe.gate.e_score_correction_bias)
        for e, expert in enumerate(ours.experts):
            expert.gate_up_proj.weight.copy_(hf_moe.experts.gate_up_proj[e])
            expert.down_proj.weight.copy_(hf_moe.experts.down_proj[e])
        shared = hf_moe.shared_experts
        ours.shared_experts.gate_up_proj.weight.copy_(torch.cat([shared.gate_proj.weight, shared.up_proj.weight]))
        ours.shared_experts.down_proj.weight.copy_(shared.down_proj.weight)
    return ours


def _randomized(module):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape) / (p.shape[-1] ** 0.5 if p.ndim > 1 else 3))
        for b in module.buffers():
            b.copy_(torch.randn(b.shape) / 3)
    return module.eval()


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_deepseek_routing_and_shared_experts_match_transformers(version):
    """V2: softmax, the best 2 of 4 groups by their best expert, weights x 1.5, not renormalized.
    V3: sigmoid plus a correction bias for the choice only, groups by their best two experts,
    renormalized, x 2.5. Both add 2 shared experts."""
    import transformers
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    sizes = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, n_routed_experts=8)
    sizes |= dict(num_experts_per_tok=2, n_shared_experts=2, n_group=4, topk_group=2, hidden_act="silu")
    if version == "v2":
        config = transformers.DeepseekV2Config(**sizes, topk_method="group_limited_greedy", routed_scaling_factor=1.5)
        hf = _randomized(DeepseekV2Moe(config))
        routing = dict(router_groups=4, router_topk_groups=2, routed_scaling_factor=1.5, norm_topk_prob=False)
    else:
        config = transformers.DeepseekV3Config(**sizes, routed_scaling_factor=2.5, norm_topk_prob=True)
        hf = _randomized(DeepseekV3MoE(config))
        routing = dict(router_scoring="sigmoid", router_groups=4, router_topk_groups=2, router_group_score="top2")
        routing |= dict(routed_scaling_factor=2.5, norm_topk_prob=True, router_correction_bias=True)
    ours = _our_moe_like(hf, num_shared_experts=2, **routing)
    x = torch.randn(3, 7, 64)
    with torch.no_grad():
        assert torch.allclose(ours(x), hf(x), atol=1e-5)
        assert torch.allclose(ours(x[:1, :1]), hf(x[:1, :1]), atol=1e-5)  # the one-token path
