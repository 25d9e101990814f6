"""Weight-only int8 / int4: round-trip bounds, kernels against naive dequantize-then-matmul, quantize_model."""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB_SIZE
from torch import nn

from nanoinfer.kernels import kernels
from nanoinfer.quant import (
    HalfLinear,
    Int4Linear,
    Int8Linear,
    dequantize_int4,
    dequantize_int8,
    quantize_int4,
    quantize_int8,
    quantize_model,
    store_weights_16bit,
    weight_bytes,
)
from nanoinfer.quant.half import KERNEL_MAX_ROWS

DTYPES = (torch.float32, torch.bfloat16)


def make_linear(k: int, n: int, bias: bool = True, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Linear:
    """A Linear with fan-in scaled random weights (and bias), like a real projection."""
    torch.manual_seed(seed)
    linear = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        linear.weight.normal_(0, k**-0.5)
        if bias:
            linear.bias.normal_(0, 0.1)
    return linear.to(dtype)


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    """max |out - ref| within rel * max |ref|: the tolerance scales with the output's magnitude."""
    err = (out.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} > {rel} * {scale:.3g}"


# With NANOINFER_KERNELS=0 (or no compiler) only the torch paths run; tests/test_kernels.py fails
# if a compiler is there but the kernels do not build.
NO_KERNELS = "our C kernels are off or not built"


def naive_int8(linear: nn.Linear, module: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    """float32 x @ (q * scale)^T + b with the module's own (possibly bf16-rounded) scales."""
    w = dequantize_int8(module.q, module.scales.float())
    out = x.float() @ w.t()
    return out if linear.bias is None else out + linear.bias.float()


def naive_int4(linear: nn.Linear, group_size: int, x: torch.Tensor) -> torch.Tensor:
    """float32 x @ ((q - zero_point) * scale)^T + b, straight from quantize_int4."""
    q, scales, zero_points = quantize_int4(linear.weight, group_size)
    out = x.float() @ dequantize_int4(q, scales, zero_points, group_size).t()
    return out if linear.bias is None else out + linear.bias.float()


# ---- round trips ------------------------------------------------------------------------------


def test_int8_round_trip_within_half_scale() -> None:
    w = torch.randn(48, 100) * torch.rand(48, 1) * 3
    w[5] = 0.0  # an all-zero row must not divide by zero
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    err = (dequantize_int8(q, scales) - w).abs()
    assert (err <= scales[:, None] / 2 * (1 + 1e-5) + 1e-12).all()
    assert torch.equal(dequantize_int8(q[5:6], scales[5:6]), torch.zeros(1, 100))


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_round_trip_within_half_scale(group_size: int) -> None:
    w = torch.randn(32, 200)  # 200 is no multiple of any group size: a partial last group
    w[0, :group_size] = 0.7  # constant group
    w[1, :group_size] = torch.rand(group_size) + 5.0  # all positive, far from zero
    q, scales, zero_points = quantize_int4(w, group_size)
    assert q.dtype == torch.uint8 and q.max() <= 15 and q.shape == w.shape
    per_elem = scales.repeat_interleave(group_size, dim=1)[:, :200]
    err = (dequantize_int4(q, scales, zero_points, group_size) - w).abs()
    assert (err <= per_elem / 2 * (1 + 1e-4) + 1e-6).all()
    assert err[0, :group_size].max() < 1e-6
    # the all-positive group still spans its own range with 16 levels
    assert scales[1, 0] <= (w[1, :group_size].max() - w[1, :group_size].min()) / 15 * 1.0001


def test_int4_requantizes_4bit_groups_without_loss() -> None:
    """Weights already on a 4-bit grid with a float minimum (GGUF Q4_1) come back exactly."""
    levels = torch.randint(0, 16, (16, 64)).float()
    levels[:, ::32] = 0  # every group uses the lowest and highest level, as Q4_1's quantizer ensures
    levels[:, 1::32] = 15
    scale, minimum = torch.rand(16, 2, 1) * 0.1 + 0.01, torch.randn(16, 2, 1)
    w = (levels.view(16, 2, 32) * scale + minimum).view(16, 64)
    q, scales, zero_points = quantize_int4(w, 32)
    torch.testing.assert_close(dequantize_int4(q, scales, zero_points, 32), w, atol=1e-6, rtol=0)


# ---- int8 kernel ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_int8_kernel_matches_naive(dtype: torch.dtype, bias: bool) -> None:
    linear = make_linear(96, 80, bias=bias, dtype=dtype)
    module = Int8Linear.from_linear(linear)
    x = torch.randn(7, 96).to(dtype)
    out = module(x)
    assert out.dtype == dtype and out.shape == (7, 80)
    # bf16 activations (and fp32 ones, which run through the bf16 kernel) round at ~2^-8
    assert_close_rel(out, naive_int8(linear, module, x), 1e-2)


def test_int8_exact_fp32_is_tight() -> None:
    linear = make_linear(96, 80)
    module = Int8Linear.from_linear(linear)
    module.exact_fp32 = True
    x = torch.randn(5, 96)
    assert_close_rel(module(x), naive_int8(linear, module, x), 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_fallback_equals_kernel(dtype: torch.dtype) -> None:
    linear = make_linear(64, 48, dtype=dtype)
    module = Int8Linear.from_linear(linear)
    x = torch.randn(2, 3, 64).to(dtype)  # leading dims are kept
    kernel_out = module(x)
    module.use_kernel = False
    fallback_out = module(x)
    assert kernel_out.shape == fallback_out.shape == (2, 3, 48)
    assert_close_rel(kernel_out, fallback_out, 1e-2)


def test_int8_odd_in_features_bf16_falls_back() -> None:
    # K % 8 != 0 crashes torch's bf16 int8 kernel; the module must route around it
    linear = make_linear(50, 24, dtype=torch.bfloat16)
    module = Int8Linear.from_linear(linear)
    x = torch.randn(5, 50).to(torch.bfloat16)
    assert_close_rel(module(x), naive_int8(linear, module, x), 1e-2)


def test_int8_group_wise_round_trips_q8_0_exactly() -> None:
    # GGUF Q8_0: w = d * q per group of 32, with max |q| = 127 in each group
    torch.manual_seed(0)
    q = torch.randint(-127, 128, (8, 96))
    q[:, ::32] = 127
    w = q.float() * (torch.rand(8, 3) * 0.01 + 1e-3).repeat_interleave(32, dim=1)
    q8, scales = quantize_int8(w, 32)
    assert scales.shape == (8, 3)
    assert torch.equal(q8, q.to(torch.int8))
    torch.testing.assert_close(dequantize_int8(q8, scales), w, rtol=1e-6, atol=0)
    per_channel = dequantize_int8(*quantize_int8(w))
    assert (per_channel - w).abs().max() > 1e-4  # what the group-wise head saves


def test_int8_group_wise_module_and_errors() -> None:
    linear = make_linear(64, 40)
    module = Int8Linear.from_linear(linear, group_size=32)
    x = torch.randn(5, 64)
    assert_close_rel(module(x), naive_int8(linear, module, x), 1e-4)  # our kernel: x rounded to int16
    module.use_kernel = False  # dequantize-then-matmul: torch's int8 kernel has no group-wise form
    assert_close_rel(module(x), naive_int8(linear, module, x), 1e-5)
    with pytest.raises(ValueError, match="multiple of the int8 group size"):
        quantize_int8(torch.randn(4, 40), 32)


@pytest.mark.parametrize("rows", [1, 3, KERNEL_MAX_ROWS + 1])  # C kernel, and widen-then-GEMM
@pytest.mark.parametrize("bias", [True, False])
def test_half_linear_is_float32_math_on_16bit_weights(rows: int, bias: bool) -> None:
    linear = make_linear(96, 40, bias=bias)
    module = HalfLinear.from_linear(linear, torch.bfloat16)
    assert module.weight.dtype == torch.bfloat16
    x = torch.randn(2, rows, 96)
    out = module(x)
    assert out.dtype == torch.float32 and out.shape == (2, rows, 40)
    ref = torch.nn.functional.linear(x, linear.weight.bfloat16().float(), linear.bias)
    assert_close_rel(out, ref, 1e-5)


def test_int8_empty_batch() -> None:
    module = Int8Linear.from_linear(make_linear(64, 32))
    assert module(torch.randn(0, 64)).shape == (0, 32)


# ---- int4 kernel ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend, group_size", [("c", 32), ("torch", 32), ("torch", 64), ("torch", 128)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 6])
def test_int4_kernel_matches_naive(backend: str, group_size: int, dtype: torch.dtype, rows: int) -> None:
    if backend == "c" and kernels() is None:
        pytest.skip(NO_KERNELS)
    linear = make_linear(256, 96, dtype=dtype)
    module = Int4Linear.from_linear(linear, group_size, backend=backend)
    assert module.kernel and module.backend == backend
    x = torch.randn(rows, 256).to(dtype)
    out = module(x)
    assert out.dtype == dtype and out.shape == (rows, 96)
    # torch's kernel: bf16 x, scales and output (~2^-8 each); ours: x rounded to int8 per group of 32
    rel = 1e-2 if dtype == torch.float32 and backend == "torch" else 2e-2
    assert_close_rel(out, naive_int4(linear, group_size, x), rel)


def test_int4_default_backend_is_ours_for_group_32() -> None:
    if kernels() is None:
        pytest.skip(NO_KERNELS)
    assert Int4Linear.from_linear(make_linear(64, 32), 32).backend == "c"
    assert Int4Linear.from_linear(make_linear(128, 32), 64).backend == "torch"


def test_int4_backend_asked_for_by_name_must_fit() -> None:
    linear = make_linear(100, 64)  # K = 100 is not a multiple of the group size, which both kernels need
    with pytest.raises(ValueError, match="'c' int4 backend"):
        Int4Linear.from_linear(linear, 32, backend="c")
    with pytest.raises(ValueError, match="torch's int4 kernel cannot run"):
        Int4Linear.from_linear(linear, 32, backend="torch")
    with pytest.raises(ValueError, match="unknown int4 backend"):
        Int4Linear.from_linear(linear, 32, backend="cuda")
    assert Int4Linear.from_linear(linear, 32, backend="dequant").backend == "dequant"


def test_int4_exact_fp32_is_tight() -> None:
    linear = make_linear(128, 64)
    module = Int4Linear.from_linear(linear, 32)
    module.exact_fp32 = True
    x = torch.randn(3, 128)
    assert_close_rel(module(x), naive_int4(linear, 32, x), 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_int4_fallback_equals_kernel(dtype: torch.dtype, bias: bool) -> None:
    linear = make_linear(128, 64, bias=bias, dtype=dtype)
    kernel = Int4Linear.from_linear(linear, 64)
    fallback = Int4Linear.from_linear(linear, 64, backend="dequant")
    assert kernel.kernel and not fallback.kernel
    x = torch.randn(4, 128).to(dtype)
    assert_close_rel(kernel(x), fallback(x), 2e-2)
    assert_close_rel(kernel.dequantize(torch.float32), fallback.dequantize(torch.float32), 1e-6)


@pytest.mark.parametrize(
    "k, n, group_size",
    [(100, 64, 32), (64, 64, 16), (576, 64, 128)],  # K % group, group size, K % 128
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_int4_odd_shapes_fall_back(k: int, n: int, group_size: int, dtype: torch.dtype) -> None:
    linear = make_linear(k, n, dtype=dtype)
    module = Int4Linear.from_linear(linear, group_size)
    assert not module.kernel
    x = torch.randn(3, k).to(dtype)
    rel = 1e-5 if dtype == torch.float32 else 2e-2
    assert_close_rel(module(x), naive_int4(linear, group_size, x), rel)


def test_int4_bias_is_added_once() -> None:
    linear = make_linear(64, 32)
    with_bias = Int4Linear.from_linear(linear, 32)
    linear.bias = None
    without = Int4Linear.from_linear(linear, 32)
    x = torch.randn(2, 64)
    b = with_bias.bias
    assert_close_rel(with_bias(x), without(x) + b, 1e-6)


# ---- quantize_model -----------------------------------------------------------------------------


def _load_tiny(tiny_model, case_id: str, dtype: torch.dtype = torch.float32):
    """Our Transformer over a tiny random checkpoint."""
    from nanoinfer.loading import load_package
    from nanoinfer.model.transformer import Transformer

    path, _ = tiny_model(case_id)
    return Transformer.from_package(load_package(path), dtype=dtype)


def _prompt(n: int = 48) -> list[int]:
    return torch.randint(4, VOCAB_SIZE, (n,), generator=torch.Generator().manual_seed(1)).tolist()


@pytest.mark.parametrize("case_id", ["llama", "qwen2"])  # qwen2: q/k/v bias
def test_quantize_model_int8_keeps_top1(tiny_model, case_id: str) -> None:
    ref_model, model = _load_tiny(tiny_model, case_id), _load_tiny(tiny_model, case_id)
    before = weight_bytes(model)
    quantize_model(model, "int8")
    assert isinstance(model.layers[0].attn.qkv_proj, Int8Linear)
    assert isinstance(model.layers[-1].mlp.down_proj, Int8Linear)
    assert isinstance(model.lm_head, Int8Linear)  # the head is always int8, in groups of 32
    assert model.lm_head.scales.shape == (VOCAB_SIZE, model.config.hidden_size // 32)
    assert weight_bytes(model) < before
    prompt = _prompt()
    ref, out = ref_model.score(prompt), model.score(prompt)
    agree = (ref.argmax(-1) == out.argmax(-1)).float().mean().item()
    assert agree >= 0.95, f"int8 top-1 agreement {agree:.2%}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_model_int4_runs(tiny_model, dtype: torch.dtype) -> None:
    ref_model, model = _load_tiny(tiny_model, "llama", dtype), _load_tiny(tiny_model, "llama", dtype)
    quantize_model(model, "int4", group_size=32)
    assert isinstance(model.layers[0].mlp.gate_up_proj, Int4Linear) and model.layers[0].mlp.gate_up_proj.kernel
    prompt = _prompt()
    ref, out = ref_model.score(prompt), model.score(prompt)
    assert torch.isfinite(out).all()
    # close-ish: 4-bit weights of a random model move logits, but keep their direction
    cos = torch.nn.functional.cosine_similarity(ref.float(), out.float(), dim=-1)
    assert cos.mean() > 0.9, f"mean cosine {cos.mean():.3f}"


def test_quantize_model_none_head_and_errors(tiny_model) -> None:
    model = _load_tiny(tiny_model, "llama")
    assert quantize_model(model, "none") is model
    assert isinstance(model.layers[0].attn.o_proj, nn.Linear)
    with pytest.raises(ValueError):
        quantize_model(model, "fp8")
    quantize_model(model, "int8", quantize_head=True)
    assert isinstance(model.lm_head, Int8Linear)
    quantize_model(model, "int4")  # already quantized modules are not re-quantized
    assert isinstance(model.layers[0].attn.o_proj, Int8Linear)


@pytest.mark.parametrize("case_id, method", [("llama", "none"), ("tied", "none"), ("llama", "int4")])
def test_store_weights_16bit(tiny_model, case_id: str, method: str) -> None:
    ref_model, model = _load_tiny(tiny_model, case_id), _load_tiny(tiny_model, case_id)
    before = weight_bytes(model)
    quantize_model(model, method)
    store_weights_16bit(model, torch.bfloat16)
    assert model.dtype == torch.float32  # activations stay float32
    assert model.embed.weight.dtype == torch.bfloat16
    if method == "none":
        assert isinstance(model.layers[0].attn.qkv_proj, HalfLinear) and isinstance(model.lm_head, HalfLinear)
        tied = model.lm_head.weight.data_ptr() == model.embed.weight.data_ptr()
        assert tied == model.config.tie_word_embeddings  # a tied head keeps one 16-bit table
        assert weight_bytes(model) <= before // 2 + 4096  # norms stay float32
    else:
        assert isinstance(model.layers[0].attn.qkv_proj, Int4Linear)
        assert isinstance(model.lm_head, Int8Linear)
    prompt = _prompt()
    ref, out = ref_model.score(prompt), model.score(prompt)
    assert out.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(ref, out, dim=-1)
    assert cos.min() > (0.999 if method == "none" else 0.9), cos.min()


@pytest.mark.parametrize("to_16bit", [False, True])
def test_dense_copy_for_large_batches_matches_the_quantized_weights(to_16bit: bool, monkeypatch) -> None:
    """Where our int8 kernel cannot run, the float copy runs above the threshold (float32, or
    16-bit widened per call) and multiplies by exactly the quantized weights; at or below it the
    quantized layer does."""
    from nanoinfer.quant import DenseForLargeBatch, _maybe_dense

    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    quantized = Int8Linear.from_linear(linear, 32)
    if quantized.panels is not None:  # on our int8 kernel no copy is kept, at any batch size
        assert _maybe_dense(quantized, linear, 32, dense_above_rows=4) is quantized
        monkeypatch.setattr("nanoinfer.quant.int8.kernels", lambda: None)  # as where they are not built
        quantized = Int8Linear.from_linear(linear, 32)
        assert quantized.panels is None
    module = _maybe_dense(quantized, linear, 32, dense_above_rows=4)
    assert isinstance(module, DenseForLargeBatch)
    if to_16bit:
        module.to_16bit(torch.bfloat16)
        assert module.dense.dtype == torch.bfloat16
    weight = dequantize_int8(*quantize_int8(linear.weight, 32))
    tol = 1e-2 if to_16bit else 1e-5
    for rows in (3, 4, 5, 13):
        x = torch.randn(rows, 96)
        ref = torch.nn.functional.linear(x, weight, linear.bias)
        torch.testing.assert_close(module(x), ref, rtol=tol, atol=tol)
