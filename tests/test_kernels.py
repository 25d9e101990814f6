"""Our C kernels against plain torch references, and the model with the kernels switched off."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import nanoinfer.kernels as kernels_module
from nanoinfer.kernels import find_compiler, kernels
from nanoinfer.model.kv_cache import read_slots
from nanoinfer.model.rope import apply_rotary
from nanoinfer.quant.int4 import _pack_panels, _unpack_panels, dequantize_int4, quantize_int4
from nanoinfer.quant.int8 import dequantize_int8, pack_panels, quantize_int8, unpack_panels

ours = kernels()
# Skip only where there is no compiler: a kernel source that fails to build must fail these tests.
pytestmark = pytest.mark.skipif(find_compiler() is None, reason="no C compiler: the C kernels are not built")


def test_kernels_build() -> None:
    assert ours is not None, "cpu_kernels.c failed to build (see the warning logged above)"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


def int8_groups(x: torch.Tensor) -> torch.Tensor:
    """x rounded as the int4 kernel rounds it: int8 per group of 32, scale max|x| / 127."""
    groups = x.view(x.shape[0], -1, 32)
    amax = groups.abs().amax(-1, keepdim=True)
    # x * (127 / amax), not x / (amax / 127): the two round a rare element to different sides
    return (torch.round(groups * (127 / amax)) * (amax / 127)).view_as(x)


# rows 1-2: tiles; 3+: strips of up to 6 rows (3 without AVX-512), the rows spread evenly over
# them; 300: two passes over the weights
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 10, 11, 12, 16, 300])
# Blocks of 16 columns, chunks of 2 blocks; strips take vectors in pairs. 64: two whole chunks;
# 40: a chunk and a half-empty 1-block tail; 37: a tail of 5 columns (a 256-bit build's second
# vector wholly past N); 72: two chunks and 8 columns; 56: a chunk whose second block is half
# full; 44: 12 columns in the last block.
@pytest.mark.parametrize("n", [40, 37, 72, 64, 56, 44])
@pytest.mark.parametrize("k", [96, 576])
def test_q4_matmul_matches_dequantized_matmul(rows: int, n: int, k: int) -> None:
    torch.manual_seed(rows * n)
    w, x, bias = torch.randn(n, k) * 0.05, torch.randn(rows, k), torch.randn(n)
    q, scales, zero_points = quantize_int4(w, 32)
    w_deq = dequantize_int4(q, scales, zero_points, 32)
    out = ours.q4_matmul(x, _pack_panels(q, scales, -zero_points * scales), n, bias)
    # The kernel's documented numerics: x rounded to int8 per group, the weight exact.
    torch.testing.assert_close(out, int8_groups(x) @ w_deq.t() + bias, rtol=1e-4, atol=1e-4)
    assert rel_err(out, x @ w_deq.t() + bias) < 2e-2  # and close to the float matmul


def test_q4_matmul_int16_sums_do_not_saturate() -> None:
    # The worst case of the int16 group sums: every q = 15 against every x = 127 (30480 per lane).
    w = torch.ones(8, 64)
    w[:, 0::32] = 0  # one zero per group keeps the range, so all the others quantize to 15
    q, scales, zero_points = quantize_int4(w, 32)
    assert (q[:, 1:32] == 15).all()
    x = torch.ones(2, 64)
    out = ours.q4_matmul(x, _pack_panels(q, scales, -zero_points * scales), 8)
    torch.testing.assert_close(out, x @ w.t())


@pytest.mark.parametrize(
    ("needs", "off"),
    [
        ({"avx512_vnni", "avx_vnni"}, ["-mno-avx512vnni", "-mno-avxvnni"]),  # AVX2 maddubs, int16 sums
        ({"avx512f"}, ["-mno-avx512f"]),  # 256-bit vectors (half a block), VNNI where there is AVX-VNNI
    ],
    ids=["without-vnni", "without-avx512"],
)
def test_kernel_builds_agree_bit_for_bit(tmp_path, needs: set[str], off: list[str]) -> None:
    """The int4 and int8 kernels' widest build on this CPU (512-bit vectors and dpbusd where it has them)
    against the same source built without those: the integer sums are the same integers and the
    float steps the same per lane, so the outputs must be bit-identical, tile and strip shapes,
    whole and partial blocks alike."""
    if not needs & kernels_module.cpu_flags():
        pytest.skip(f"this CPU has none of {sorted(needs)}: the build without them is the only one")
    import subprocess

    narrower = tmp_path / "narrower.so"
    cc = find_compiler()
    assert cc is not None
    command = [cc, *kernels_module._FLAGS, *off, "-o", str(narrower), str(kernels_module.SOURCE), "-lm"]
    subprocess.run(command, check=True)
    other = kernels_module.CpuKernels(narrower)
    torch.manual_seed(0)
    shapes = [(1, 72, 576), (2, 40, 96), (3, 56, 576), (5, 13, 64), (9, 37, 576), (16, 37, 576), (300, 64, 96)]
    for rows, n, k in shapes:
        q, scales, zero_points = quantize_int4(torch.randn(n, k) * 0.05, 32)
        packed, x = _pack_panels(q, scales, -zero_points * scales), torch.randn(rows, k)
        assert torch.equal(ours.q4_matmul(x, packed, n), other.q4_matmul(x, packed, n)), (rows, n, k)
        q8, scales8 = quantize_int8(torch.randn(n, k), 32)
        panels = pack_panels(q8, scales8)
        assert torch.equal(ours.q8_matmul(x, panels, n), other.q8_matmul(x, panels, n)), ("int8", rows, n, k)


def test_q4_panels_round_trip() -> None:
    q, scales, zero_points = quantize_int4(torch.randn(13, 64), 32)
    packed = _pack_panels(q, scales, -zero_points * scales)
    assert packed.numel() == 2 * (256 + 128)  # 1 block (13 columns padded to 16) x 2 groups
    q2, scales2, mins2 = _unpack_panels(packed, 13, 64)
    assert torch.equal(q2, q) and torch.equal(scales2, scales) and torch.equal(mins2, -zero_points * scales)


def test_q4_matmul_zero_activations_give_bias() -> None:
    q, scales, zero_points = quantize_int4(torch.randn(16, 64), 32)
    out = ours.q4_matmul(torch.zeros(2, 64), _pack_panels(q, scales, -zero_points * scales), 16, torch.arange(16.0))
    assert torch.equal(out, torch.arange(16.0).expand(2, 16))


def int16_groups(x: torch.Tensor) -> torch.Tensor:
    """x rounded as the int8 kernel rounds it: int16 per group of 32, scale max|x| / 32767."""
    groups = x.view(x.shape[0], -1, 32)
    amax = groups.abs().amax(-1, keepdim=True)
    # a tensor divided by a tensor rounds once, as the kernel's 32767.f / amax does (a scalar
    # numerator goes through a reciprocal here, which moves rare elements by one step)
    inv = torch.where(amax > 0, torch.full_like(amax, 32767.0) / amax, 0)
    q = torch.round(groups * inv)
    return (q * (amax / 32767)).view_as(x)


@pytest.mark.parametrize("n, k, group", [(24, 64, None), (13, 96, 32), (37, 64, 32), (8, 32, None)])
def test_q8_panels_round_trip(n: int, k: int, group: int | None) -> None:
    """13 and 37 columns: a padded last panel, and a short last chunk of panels (3 panels = 2 + 1)."""
    q, scales = quantize_int8(torch.randn(n, k), group)
    packed = pack_panels(q, scales)
    assert packed.numel() == -(-n // 16) * (k // 32) * (512 + 64)
    q2, scales2 = unpack_panels(packed, n, k)
    assert torch.equal(q2, q)
    assert torch.equal(scales2, scales.reshape(n, -1).expand(n, k // 32))  # per-channel: repeated per group


# strips of up to 6 rows (3 without AVX-512), the rows spread evenly; 300: past the 256-row pass
# of activations kept in L2
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 9, 13, 40, 300])
@pytest.mark.parametrize("n, k, group", [(24, 64, None), (37, 96, 32), (61, 1536, None)])
def test_q8_matmul_matches_its_numerics(rows: int, n: int, k: int, group: int | None) -> None:
    """Activations rounded to int16 per group of 32, int8 weights exact: float32 to rounding order."""
    torch.manual_seed(rows + n)
    w, x, bias = torch.randn(n, k), torch.randn(rows, k), torch.randn(n)
    q, scales = quantize_int8(w, group)
    w_deq = dequantize_int8(q, scales)
    out = ours.q8_matmul(x, pack_panels(q, scales), n, bias)
    torch.testing.assert_close(out, int16_groups(x) @ w_deq.t() + bias, rtol=1e-5, atol=1e-4)
    assert rel_err(out, x @ w_deq.t() + bias) < 1e-4  # and within 2^-16-ish of exact float32


def test_q8_matmul_zero_and_outlier_groups() -> None:
    """An all-zero group (scale 0) gives zeros, and one huge activation only coarsens its own group."""
    q, scales = quantize_int8(torch.randn(16, 96), 32)
    w_deq = dequantize_int8(q, scales)
    x = torch.randn(3, 96)
    x[0, :32] = 0.0
    x[1, 40] = 1e4
    out = ours.q8_matmul(x, pack_panels(q, scales), 16)
    torch.testing.assert_close(out, int16_groups(x) @ w_deq.t(), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(ours.q8_matmul(torch.zeros(2, 96), pack_panels(q, scales), 16), torch.zeros(2, 16))


@pytest.mark.parametrize("rows", [1, 4, 7, 40])
@pytest.mark.parametrize("k", [64, 100])  # 100: a tail past the vector loops
def test_bf16_matmul_is_exact_fp32(rows: int, k: int) -> None:
    torch.manual_seed(rows)
    w, x, bias = torch.randn(24, k).bfloat16(), torch.randn(rows, k), torch.randn(24)
    ref = x @ w.float().t() + bias  # widening bf16 to float32 is exact, so only the sum order differs
    torch.testing.assert_close(ours.bf16_matmul(x, w, bias), ref, rtol=1e-5, atol=1e-5)


def _reference_decode(q, k_cache, v_cache, tables, lens, block_size, window, scale):
    """SDPA over each sequence's gathered context, one sequence at a time."""
    outs = []
    for b, n in enumerate(lens.tolist()):
        pos = torch.arange(n)
        slots = tables[b][pos // block_size] * block_size + pos % block_size
        if window:
            slots = slots[max(0, n - window) :]
        keys, values = read_slots(k_cache, slots).transpose(0, 1), read_slots(v_cache, slots).transpose(0, 1)
        o = F.scaled_dot_product_attention(q[b].unsqueeze(1), keys, values, scale=scale, enable_gqa=True)
        outs.append(o.squeeze(1).flatten())
    return torch.stack(outs)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (6, 2), (3, 1), (8, 2)])  # (8, 2): groups of 4 run as 3 + 1
@pytest.mark.parametrize("window", [0, 5, 40])
@pytest.mark.parametrize("D", [16, 64, 136])  # 64: the register-blocked value loop; 136: it plus a tail
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_paged_attention_decode_rows_match_sdpa(heads: int, kv_heads: int, window: int, D: int, cache_dtype) -> None:
    """Half caches are widened exactly, so both dtypes match SDPA over the same stored values."""
    torch.manual_seed(heads + window + D)
    block_size, num_blocks = 4, 64
    k_cache, v_cache = torch.randn(2, num_blocks, kv_heads, block_size, D).to(cache_dtype).unbind(0)
    # keys in groups of three or four (by head count), and tails of 1, 2 and 3 keys after them
    lens = torch.tensor([1, 7, 13, 4, 61, 100, 6, 8, 99])
    tables = torch.stack([torch.randperm(num_blocks)[:25] for _ in lens])  # scattered, shared pool
    # queries as rows of a wider buffer, as they sit in the fused qkv projection
    qkv = torch.randn(len(lens), (heads + 2 * kv_heads) * D)
    q = qkv[:, : heads * D].unflatten(-1, (heads, D))
    out = ours.paged_attention(qkv, heads, k_cache, v_cache, tables, lens, window, D**-0.5)
    ref = _reference_decode(q, k_cache.float(), v_cache.float(), tables, lens, block_size, window, D**-0.5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [0, 6])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_paged_attention_prompt_rows_share_a_table(window: int, cache_dtype) -> None:
    """Prompt rows: each reads its sequence's table through row_table, causal by its own ctx_len."""
    torch.manual_seed(window)
    heads, kv_heads, D, block_size, num_blocks = 6, 2, 64, 4, 32
    k_cache, v_cache = torch.randn(2, num_blocks, kv_heads, block_size, D).to(cache_dtype).unbind(0)
    tables = torch.stack([torch.randperm(num_blocks)[:8] for _ in range(2)])
    # sequence 0: a fresh 9-token prompt; sequence 1: 5 new tokens after 14 cached ones
    row_table = torch.tensor([0] * 9 + [1] * 5)
    lens = torch.cat([torch.arange(1, 10), torch.arange(15, 20)])
    qkv = torch.randn(len(lens), (heads + 2 * kv_heads) * D)
    q = qkv[:, : heads * D].unflatten(-1, (heads, D))
    out = ours.paged_attention(qkv, heads, k_cache, v_cache, tables, lens, window, 0.125, row_table)
    ref = _reference_decode(q, k_cache.float(), v_cache.float(), tables[row_table], lens, block_size, window, 0.125)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_rms_norm_matches_torch() -> None:
    x, w = torch.randn(5, 3, 64), torch.rand(64) + 0.5
    torch.testing.assert_close(ours.rms_norm(x, w, 1e-6), F.rms_norm(x, (64,), w, 1e-6), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_qk_rope_store_matches_torch(qk_norm: bool) -> None:
    torch.manual_seed(int(qk_norm))
    T, H, KVH, D = 3, 4, 2, 8
    qkv = torch.randn(T, (H + 2 * KVH) * D)
    angles = torch.arange(T).float()[:, None] * (1.0 / 10000 ** (torch.arange(0, D, 2) / D))
    angles = torch.cat([angles, angles], -1)[:, None]
    cos, sin = angles.cos(), angles.sin()
    qn, kn = (torch.rand(D) + 0.5, torch.rand(D) + 0.5) if qk_norm else (None, None)
    q, k, v = (t.unflatten(-1, (-1, D)) for t in qkv.clone().split([H * D, KVH * D, KVH * D], -1))
    if qk_norm:
        q, k = F.rms_norm(q, (D,), qn, 1e-6), F.rms_norm(k, (D,), kn, 1e-6)
    q_ref, k_ref = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    k_cache, v_cache = torch.zeros(2, 5, KVH, 2, D).unbind(0)  # 10 slots in blocks of 2
    slots = torch.tensor([7, 2, 9])
    ours.qk_rope_store(qkv, H, KVH, D, qn, kn, 1e-6, cos, sin, k_cache, v_cache, slots)
    torch.testing.assert_close(qkv[:, : H * D].view(T, H, D), q_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(read_slots(k_cache, slots), k_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(read_slots(v_cache, slots), v)
    others = torch.tensor([s for s in range(10) if s not in slots.tolist()])
    assert read_slots(k_cache, others).abs().sum() == 0  # nothing written outside the slots
    assert read_slots(v_cache, others).abs().sum() == 0


def test_qk_rope_store_narrows_to_a_half_cache_as_torch_rounds() -> None:
    """A float16 cache gets exactly torch's .half() of the rotated k and of v, specials included."""
    torch.manual_seed(0)
    T, H, KVH, D = 4, 2, 1, 20  # 20: two vectors of 8 and a scalar tail per row
    qkv = torch.randn(T, (H + 2 * KVH) * D) * 3
    # v of row 0: overflow to inf, values that round to the largest half and to subnormals, 0, nan
    qkv[0, (H + KVH) * D : (H + KVH) * D + 8] = torch.tensor([7e4, 65519.0, -65505.0, 3e-6, -1e-7, 6e-8, 0.0, math.nan])
    qkv[0, -1] = 65520.0  # the tail's scalar path: rounds to inf
    cos, sin = torch.ones(T, D), torch.zeros(T, D)  # no rotation: k is stored as projected
    k_cache, v_cache = torch.zeros(2, 2, KVH, 3, D, dtype=torch.float16).unbind(0)  # 6 slots in blocks of 3
    slots = torch.tensor([5, 0, 3, 1])
    k, v = qkv[:, H * D : (H + KVH) * D].clone(), qkv[:, (H + KVH) * D :].clone()
    ours.qk_rope_store(qkv, H, KVH, D, None, None, 0.0, cos, sin, k_cache, v_cache, slots)
    assert torch.equal(read_slots(k_cache, slots).flatten(1), k.half())
    stored, expected = read_slots(v_cache, slots).flatten(1), v.half()
    assert torch.equal(stored.isnan(), expected.isnan())
    assert torch.equal(stored[~stored.isnan()], expected[~expected.isnan()])


@pytest.mark.parametrize("gelu", [False, True])
def test_gated_act_matches_torch(gelu: bool) -> None:
    gate_up = torch.randn(3, 44) * 3  # 22 wide: two vectors of 8 and a scalar tail
    gate_up[0, :6] = torch.tensor([-100.0, -30.0, -9.0, 9.0, 30.0, 100.0])  # saturated tails of the sigmoid
    gate, up = gate_up.split(22, -1)
    ref = (F.gelu(gate, approximate="tanh") if gelu else F.silu(gate)) * up
    torch.testing.assert_close(ours.gated_act(gate_up, gelu), ref, rtol=1e-5, atol=1e-5)


def test_build_is_cached(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("NANOINFER_CACHE", str(tmp_path))
    first = kernels_module._build()
    assert first is not None and first.parent == tmp_path / "kernels"
    mtime = first.stat().st_mtime_ns
    assert kernels_module._build() == first and first.stat().st_mtime_ns == mtime  # not rebuilt


@pytest.fixture
def no_kernels(monkeypatch):
    """Every module takes its torch path, as on a machine without a C compiler."""
    monkeypatch.setattr(kernels_module, "_loaded", None)


@pytest.mark.parametrize("case_id", ["llama", "gemma3"])
def test_torch_path_equals_kernel_path(tiny_model, no_kernels, monkeypatch, case_id: str) -> None:
    """The same logits with and without the C kernels (unquantized float32: no rounding differs)."""
    from nanoinfer.loading import load_package
    from nanoinfer.model.transformer import Transformer

    path, _ = tiny_model(case_id)
    model = Transformer.from_package(load_package(path))
    prompt = list(range(5, 45))
    without = model.score(prompt)
    monkeypatch.setattr(kernels_module, "_loaded", ours)
    with_kernels = model.score(prompt)
    torch.testing.assert_close(with_kernels, without, rtol=1e-4, atol=1e-4)
    assert math.isfinite(with_kernels.sum().item())


@pytest.mark.parametrize("case_id", ["llama", "gemma3"])
def test_torch_path_greedy_matches_transformers(tiny_model, no_kernels, case_id: str) -> None:
    """Decode through the torch attention path (block gather + SDPA) still equals transformers."""
    from test_parity import NEW_TOKENS, hf_greedy, random_prompt

    from nanoinfer import LLM, SamplingParams

    path, hf_model = tiny_model(case_id)
    prompt = random_prompt(case_id)
    llm = LLM(str(path), dtype="float32")
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True))
    assert list(out[0].token_ids) == hf_greedy(hf_model, prompt, NEW_TOKENS)


@pytest.mark.parametrize("case_id", ["llama", "qwen2", "qwen3", "mistral"])  # + bias, q/k norm, window
def test_fused_decode_layer_equals_layer_by_layer(tiny_model, monkeypatch, case_id: str) -> None:
    """int4 decode through one C call for all layers (decode_layers) gives the tokens the
    module-by-module path gives."""
    from nanoinfer import LLM, SamplingParams
    from nanoinfer.model.transformer import Transformer

    path, _ = tiny_model(case_id)
    prompts = [list(range(5, 5 + n)) for n in (7, 20, 33)]  # three rows of different context lengths
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    # no prefix cache: the second run must compute its prompts exactly as the first did
    llm = LLM(str(path), quantization="int4", enable_prefix_cache=False)
    assert llm.engine.model.layers[0]._fused_plan() is not None
    fused = [list(o.token_ids) for o in llm.generate(prompts, params)]
    assert llm.engine.model._stack is not None  # the one-call path ran
    monkeypatch.setattr(Transformer, "_fused_stack", lambda self, *args: None)
    layer_by_layer = [list(o.token_ids) for o in llm.generate(prompts, params)]
    assert fused == layer_by_layer
