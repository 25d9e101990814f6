"""Our CPU kernels (cpu_kernels.c): built with the host C compiler at first use, called through ctypes.

Why C and not torch ops: at batch 1 a decode step is ~120 small matmuls plus attention, and
torch 2.13's CPU int4/int8 kernels round activations to bf16, and torch's int4 path left us far
behind llama.cpp (docs/performance.md, "Kernels"). A plain C file needs no torch headers,
so it compiles in about a second; the shared library is cached under ~/.cache/nanoinfer/kernels
(or $NANOINFER_CACHE/kernels) keyed by a hash of the source, flags, compiler and the CPU that
`-march=native` resolves to, so a home directory shared between machines never hands one a library
built for another's instructions (SIGILL).

The kernels are used only on x86-64 CPUs with AVX, AVX2, FMA and F16C (checked at run time from
/proc/cpuinfo): that is what their vector paths are written for. Elsewhere, without a compiler, or
with NANOINFER_KERNELS=0, `kernels()` returns None (logging why) and callers keep their torch paths.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Literal

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
Q4_GROUP = 32  # the group size the C int4 kernel is written for
Q4_COLS = 16  # output columns per block of its weight layout
Q4_CHUNK = 2  # blocks per chunk (one sequential record per group)
Q4_BLOCK_BYTES = Q4_COLS * Q4_GROUP // 2  # a block's nibbles per group
Q4_RECORD = Q4_BLOCK_BYTES + 2 * 4 * Q4_COLS  # bytes per block and group: nibbles, float scales and mins
Q8_COLS, Q8_GROUP, Q8_CHUNK = 16, 32, 2  # the int8 kernel's columns per panel, k per group, panels per chunk
Q8_PAIRS_BYTES = Q8_COLS * Q8_GROUP  # a panel's int8 weights per group: 16 k-pairs of Q8_COLS columns
Q8_RECORD = Q8_PAIRS_BYTES + 4 * Q8_COLS  # bytes per panel and group: weights, then float scales


def chunk_spans(count: int, per_chunk: int) -> list[tuple[int, int, int]]:
    """How the kernels' weight layouts chunk `count` column blocks: (first, end, blocks per chunk)
    for the whole chunks, then a short last one."""
    whole = count // per_chunk * per_chunk
    return [span for span in ((0, whole, per_chunk), (whole, count, count - whole)) if span[1] > span[0]]


_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
_lock = threading.Lock()
_loaded: CpuKernels | None | Literal[False] = False  # False: not tried yet


def cache_dir() -> Path:
    root = os.environ.get("NANOINFER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nanoinfer")
    return Path(root) / "kernels"


def find_compiler() -> str | None:
    """The C compiler the kernels are built with: $CC, else cc or gcc on PATH; None if there is none."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


# The instruction sets cpu_kernels.c's vector paths use (/proc/cpuinfo names): 256-bit float (avx)
# and integer (avx2) ops, fused multiply-add (fma), half <-> float conversion (f16c).
REQUIRED_CPU_FLAGS = frozenset({"avx", "avx2", "fma", "f16c"})
_X86_64 = ("x86_64", "amd64")  # platform.machine() on Linux, and on Windows / the BSDs
# cc1 options that take the target as a separate value: gcc's --param (cache sizes it tunes for)
# and clang's CPU and feature list.
_TARGET_OPTIONS = ("--param", "-target-cpu", "-target-feature", "-tune-cpu")


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as Linux reports them; empty where /proc/cpuinfo cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def unsupported_reason() -> str | None:
    """Why this machine must not run the kernels (None: it may), checked before building them."""
    machine = platform.machine()
    if machine.lower() not in _X86_64:
        return f"they are written for x86-64, this machine is {machine or 'unknown'}"
    flags = cpu_flags()
    if not flags:  # no /proc/cpuinfo (not Linux): the instructions cannot be confirmed
        return "this CPU's features cannot be read from /proc/cpuinfo"
    missing = REQUIRED_CPU_FLAGS - flags
    if missing:
        return f"this CPU lacks {', '.join(sorted(missing))}"
    return None


def _target_args(cc1: list[str]) -> list[str]:
    """The options of a cc1 command line that name the target: gcc's -march=/-m<feature>/--param,
    clang's -target-cpu/-target-feature values. Paths and the working directory are dropped, so
    the key does not change with where the probe ran."""
    return [
        arg for prev, arg in zip(["", *cc1], cc1) if arg.startswith(("-m", *_TARGET_OPTIONS)) or prev in _TARGET_OPTIONS
    ]


@functools.cache
def native_target(cc: str) -> str:
    """What `-march=native` resolves to with compiler `cc` on this machine: the target options its
    driver passes to cc1 (gcc and clang print that command line for `-###`). Cached per process:
    it costs a compiler start. Falls back to the CPU's flags if the compiler prints no cc1 line."""
    probe = subprocess.run(
        [cc, "-march=native", "-###", "-E", "-"], stdin=subprocess.DEVNULL, capture_output=True, text=True
    )
    for line in (probe.stderr + probe.stdout).splitlines():
        try:
            args = shlex.split(line)
        except ValueError:  # an unbalanced quote in some unrelated line
            continue
        if args and (Path(args[0]).name == "cc1" or "-cc1" in args):
            return " ".join(_target_args(args))
    return "cpuinfo: " + " ".join(sorted(cpu_flags()))


def _cache_key(cc: str) -> str:
    """The hash the .so is cached under: everything that changes the machine code it holds."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    parts = [SOURCE.read_bytes(), " ".join(_FLAGS).encode(), version.encode(), native_target(cc).encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def _build() -> Path | None:
    """Compile cpu_kernels.c once per (source, flags, compiler, target CPU); returns the .so path or None."""
    cc = find_compiler()
    if cc is None:
        log.warning("no C compiler found: nanoinfer runs on torch's kernels only (slower)")
        return None
    target = cache_dir() / f"cpu_kernels-{_cache_key(cc)}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent processes never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    result = subprocess.run([cc, *_FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True)
    if result.returncode != 0:
        os.unlink(tmp)
        log.warning("building nanoinfer's C kernels failed, using torch's kernels:\n%s", result.stderr[-2000:])
        return None
    os.replace(tmp, target)
    return target


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class Q4Weight(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("n", ctypes.c_int64)]


class DecodeMoE(ctypes.Structure):
    """A mixture-of-experts MLP for the C decode_layer: softmax routing, int4 experts."""

    _fields_ = [
        *((name, ctypes.c_int64) for name in ("experts", "top_k", "renormalize", "inter")),
        ("scaling", ctypes.c_float),
        ("router", ctypes.c_void_p),
        ("gate_up", ctypes.POINTER(Q4Weight)),
        ("down", ctypes.POINTER(Q4Weight)),
        ("load", ctypes.c_void_p),
    ]


class DecodeLayer(ctypes.Structure):
    """Everything the C decode_layer needs of one layer: sizes, weights and that layer's KV cache."""

    _fields_ = [
        *((name, ctypes.c_int64) for name in ("hidden", "heads", "kv_heads", "head_dim", "inter", "window", "gelu")),
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
        *((name, ctypes.c_void_p) for name in ("input_norm", "mlp_norm", "q_norm", "k_norm")),
        *((name, Q4Weight) for name in ("qkv", "o", "gate_up", "down")),
        ("k_cache", ctypes.c_void_p),
        ("v_cache", ctypes.c_void_p),
        ("moe", ctypes.POINTER(DecodeMoE)),  # None: a dense MLP
    ]


class ShmGroup(ctypes.Structure):
    """A tensor-parallel group's shared-memory segment as one rank sees it (see cpu_kernels.c)."""

    _fields_ = [
        ("rank", ctypes.c_int64),
        ("world", ctypes.c_int64),
        ("capacity", ctypes.c_int64),
        ("flags", ctypes.c_void_p),
        ("data", ctypes.c_void_p),
        ("step", ctypes.c_int64),
        ("ns", ctypes.c_int64),
    ]


class DecodeStep(ctypes.Structure):
    """The per-step addressing every layer shares: RoPE tables, KV slots, block tables, and the
    tensor-parallel group the layers sum their partial outputs over (None: one rank)."""

    _fields_ = [
        *((name, ctypes.c_void_p) for name in ("cos_t", "sin_t", "slots", "block_tables", "ctx_lens")),
        ("max_blocks", ctypes.c_int64),
        ("block_size", ctypes.c_int64),
        ("kv_half", ctypes.c_int64),
        ("tp", ctypes.POINTER(ShmGroup)),
    ]


# KV cache dtypes the C attention reads: float32, or IEEE half for half the memory traffic.
KV_DTYPES = (torch.float32, torch.float16)


def kv_half(cache: torch.Tensor) -> int:
    """The kernels' kv_half flag for a cache tensor (1: it holds float16)."""
    return int(cache.dtype == torch.float16)


def q4_weight(packed: torch.Tensor, out_features: int, bias: torch.Tensor | None) -> Q4Weight:
    return Q4Weight(packed.data_ptr(), _ptr(bias), out_features)


class CpuKernels:
    """ctypes bindings. Tensor arguments must be float32 (int64 for indices) CPU tensors laid out
    as each method says; the wrappers are kept lean because a decode step calls them ~250 times."""

    def __init__(self, path: Path):
        lib = ctypes.CDLL(str(path))
        i64, ptr, f32, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
        signatures = {
            "q4_matmul": [ptr, i64, i64, ptr, i64, ptr, ptr, i32],
            "q8_matmul": [ptr, i64, i64, ptr, i64, ptr, ptr, i32],
            "bf16_matmul": [ptr, i64, i64, ptr, i64, ptr, ptr, i32],
            "paged_attention": [ptr, i64, ptr, ptr, i32, ptr, i64, ptr, ptr, *[i64] * 6, f32, ptr, i32],
            "rms_norm": [ptr, i64, i64, i64, ptr, f32, ptr],
            "qk_rope_store": [ptr, i64, i64, i64, i64, i64, ptr, ptr, f32, ptr, ptr, ptr, ptr, i32, ptr, i64],
            "gated_act": [ptr, i64, i64, i32, ptr, i32],
            "decode_layers": [ctypes.POINTER(DecodeLayer), i64, ctypes.POINTER(DecodeStep), ptr, i64, i32],
            "moe_experts": [ctypes.POINTER(Q4Weight), ctypes.POINTER(Q4Weight), i64, ptr, ptr, i64, i64, i32, ptr, i32],
            "shm_all_reduce": [ctypes.POINTER(ShmGroup), ptr, i64],
            "shm_all_gather": [ctypes.POINTER(ShmGroup), ptr, i64, ptr],
            "shm_broadcast": [ctypes.POINTER(ShmGroup), ptr, i64],
        }
        returns_status = ("decode_layers", "shm_all_reduce", "shm_all_gather", "shm_broadcast")
        for name, argtypes in signatures.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, (ctypes.c_int if name in returns_status else None)
        self.lib = lib
        self.path = path

    def _matmul(self, fn, x: torch.Tensor, weight: torch.Tensor, N: int, bias: torch.Tensor | None) -> torch.Tensor:
        """The kernels with signature (x, M, K, weight, N, bias, out, threads) -> out [M, N]."""
        M, K = x.shape
        out = torch.empty(M, N)
        fn(x.data_ptr(), M, K, weight.data_ptr(), N, _ptr(bias), out.data_ptr(), torch.get_num_threads())
        return out

    def q4_matmul(
        self, x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [M, K] contiguous @ int4 weight -> [M, N]; `packed` as quant.int4._pack_panels lays it out."""
        return self._matmul(self.lib.q4_matmul, x, packed, out_features, bias)

    def q8_matmul(
        self, x: torch.Tensor, panels: torch.Tensor, out_features: int, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [M, K] contiguous @ int8 weight -> [M, N]; `panels` as quant.int8.pack_panels lays it out."""
        return self._matmul(self.lib.q8_matmul, x, panels, out_features, bias)

    def bf16_matmul(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [M, K] contiguous float32 @ bfloat16 weight [N, K]^T -> float32 [M, N], products in float32."""
        return self._matmul(self.lib.bf16_matmul, x, weight, weight.shape[0], bias)

    def paged_attention(
        self,
        q: torch.Tensor,
        num_heads: int,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        ctx_lens: torch.Tensor,
        window: int,
        scale: float,
        row_table: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of B query rows against the paged cache, each row causal by its ctx_lens (its own
        token the last key): decode steps and prompt rows alike.

        q: B rows (row stride q.stride(0)) starting with num_heads heads of D; caches
        [blocks, KVH, block_size, D] (PagedKVCache), float32 or float16 (KV_DTYPES);
        block_tables [S, max_blocks]; row_table [B] (which table row each query reads; None: row b
        reads row b) and ctx_lens [B], int64. Returns [B, num_heads * D]."""
        B = ctx_lens.shape[0]
        _, kvh, block_size, D = k_cache.shape
        out = torch.empty(B, num_heads * D)
        self.lib.paged_attention(
            q.data_ptr(),
            q.stride(0),
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            kv_half(k_cache),
            block_tables.data_ptr(),
            block_tables.shape[1],
            _ptr(row_table),
            ctx_lens.data_ptr(),
            B,
            num_heads,
            kvh,
            D,
            block_size,
            window,
            scale,
            out.data_ptr(),
            torch.get_num_threads(),
        )
        return out

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """RMSNorm over the last dim of a contiguous x."""
        D = x.shape[-1]
        out = torch.empty_like(x)
        self.lib.rms_norm(x.data_ptr(), x.numel() // D, D, D, weight.data_ptr(), eps, out.data_ptr())
        return out

    def qk_rope_store(
        self,
        qkv: torch.Tensor,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        q_norm: torch.Tensor | None,
        k_norm: torch.Tensor | None,
        eps: float,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slots: torch.Tensor,
    ) -> None:
        """In place on qkv [T, (H + 2 KVH) * D] (rows may be strided): norm and rotate q, k; store k, v
        (narrowed to the cache's dtype, float32 or float16; caches as PagedKVCache lays them out)."""
        self.lib.qk_rope_store(
            qkv.data_ptr(),
            qkv.shape[0],
            qkv.stride(0),
            num_heads,
            num_kv_heads,
            head_dim,
            _ptr(q_norm),
            _ptr(k_norm),
            eps,
            cos.data_ptr(),
            sin.data_ptr(),
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            kv_half(k_cache),
            slots.data_ptr(),
            k_cache.shape[2],
        )

    def gated_act(self, gate_up: torch.Tensor, gelu: bool) -> torch.Tensor:
        """act(gate) * up for a contiguous gate_up [T, 2I]; silu, or gelu-tanh."""
        T, two_i = gate_up.shape
        out = torch.empty(T, two_i // 2)
        self.lib.gated_act(gate_up.data_ptr(), T, two_i // 2, int(gelu), out.data_ptr(), torch.get_num_threads())
        return out

    def moe_experts(
        self, gate_up: ctypes.Array, down: ctypes.Array, counts: torch.Tensor, x: torch.Tensor, inter: int, gelu: bool
    ) -> torch.Tensor:
        """Each int4 expert's gated MLP over its rows of x [rows, hidden] (grouped by expert,
        counts [experts] int64 rows each) -> [rows, hidden]."""
        out = torch.empty_like(x)
        self.lib.moe_experts(
            gate_up, down, len(gate_up), counts.data_ptr(), x.data_ptr(), x.shape[1], inter, int(gelu),
            out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return out

    def decode_layers(self, layers: ctypes.Array, step: DecodeStep, x: torch.Tensor) -> None:
        """Every layer of a ctypes DecodeLayer array in turn over the decode rows x, in place."""
        status = self.lib.decode_layers(
            layers, len(layers), ctypes.byref(step), x.data_ptr(), x.shape[0], torch.get_num_threads()
        )
        if status:
            raise TensorParallelAborted("a tensor-parallel rank stopped during the step")


class TensorParallelAborted(RuntimeError):
    """A shared-memory exchange gave up because the group was aborted (a rank died or is closing)."""


def kernels() -> CpuKernels | None:
    """The built kernels, or None where they cannot be built, must not run on this CPU, or are
    switched off (NANOINFER_KERNELS=0). Loaded once per process."""
    global _loaded
    if _loaded is False:
        with _lock:
            if _loaded is False:
                _loaded = None  # an unexpected error below leaves them off rather than retried per call
                _loaded = _load()
    return _loaded or None


def _load() -> CpuKernels | None:
    """Build and load the kernels, or None with the reason logged once (NANOINFER_KERNELS=0: silently)."""
    if os.environ.get("NANOINFER_KERNELS", "1") == "0":
        return None
    reason = unsupported_reason()
    if reason is not None:
        log.warning("nanoinfer's C kernels are off (%s): using torch's kernels", reason)
        return None
    try:
        path = _build()
        return CpuKernels(path) if path is not None else None
    except OSError as exc:
        log.warning("loading nanoinfer's C kernels failed, using torch's kernels: %s", exc)
        return None
