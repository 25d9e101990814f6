"""Where the C kernels load: the build cache is keyed by the target CPU, and they stay off on
machines they are not written for (run here by faking the machine, the CPU flags or the compiler)."""

from __future__ import annotations

import logging
import subprocess

import pytest

import nanoinfer.kernels as kernels_module
from nanoinfer.kernels import find_compiler, kernels

GCC_PROBE = (
    "Target: x86_64-linux-gnu\n"
    ' /usr/lib/gcc/x86_64-linux-gnu/12/cc1 -E -quiet -imultiarch x86_64-linux-gnu - "-march=znver3" -mmmx '
    '-mavx2 -mno-fma4 -mfma -mf16c --param "l1-cache-size=48" "-mtune=znver3" -fasynchronous-unwind-tables '
    "-dumpbase -\n"
)
CLANG_PROBE = (
    "clang version 16.0.6\nTarget: x86_64-pc-linux-gnu\n"
    ' "/usr/lib/llvm-16/bin/clang" "-cc1" "-triple" "x86_64-pc-linux-gnu" "-E" "-main-file-name" "-" '
    '"-mrelocation-model" "pic" "-target-cpu" "znver3" "-target-feature" "+avx2" "-target-feature" "-avx512f" '
    '"-tune-cpu" "generic" "-fdebug-compilation-dir=/home/someone/project" "-x" "c" "-"\n'
)


def fake_compiler(monkeypatch: pytest.MonkeyPatch, stderr: str) -> None:
    """Every subprocess the kernels module starts answers with `stderr` (as `cc -###` does)."""

    def run(args, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess(args, 0, stdout="", stderr=stderr)

    monkeypatch.setattr(kernels_module.subprocess, "run", run)


def test_probe_reads_gcc_target(monkeypatch) -> None:
    fake_compiler(monkeypatch, GCC_PROBE)
    target = kernels_module.native_target.__wrapped__("gcc")  # past the per-process cache
    assert target == "-march=znver3 -mmmx -mavx2 -mno-fma4 -mfma -mf16c --param l1-cache-size=48 -mtune=znver3"


def test_probe_reads_clang_target_without_paths(monkeypatch) -> None:
    fake_compiler(monkeypatch, CLANG_PROBE)
    target = kernels_module.native_target.__wrapped__("clang")
    assert "-target-cpu znver3" in target and "-target-feature +avx2 -target-feature -avx512f" in target
    assert "/home/someone" not in target  # the working directory must not change the key


def test_probe_falls_back_to_cpu_flags(monkeypatch) -> None:
    fake_compiler(monkeypatch, "cc: unrecognized option '-###'\n")
    monkeypatch.setattr(kernels_module, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert kernels_module.native_target.__wrapped__("cc") == "cpuinfo: avx2 fma"


@pytest.mark.skipif(find_compiler() is None, reason="no C compiler")
def test_probe_of_this_compiler_names_a_target() -> None:
    target = kernels_module.native_target(find_compiler())
    assert "-march=" in target or "-target-cpu" in target, target


@pytest.mark.skipif(find_compiler() is None, reason="no C compiler")
def test_cache_key_follows_target_cpu(monkeypatch) -> None:
    """Two machines sharing ~/.cache whose -march=native differ get different libraries."""
    cc = find_compiler()
    keys = {}
    for cpu in ("-march=znver3 -mavx512f", "-march=haswell -mno-avx512f", "-march=znver3 -mavx512f"):
        monkeypatch.setattr(kernels_module, "native_target", lambda _cc, cpu=cpu: cpu)
        keys.setdefault(cpu, set()).add(kernels_module._cache_key(cc))
    assert all(len(k) == 1 for k in keys.values())  # the same CPU: the same key
    assert len(set.union(*keys.values())) == 2


@pytest.fixture
def fresh_load(monkeypatch):
    """kernels() as at first use in a process; the module's loaded kernels come back afterwards.
    Building is refused: none of these tests may reach the compiler."""
    monkeypatch.setattr(kernels_module, "_loaded", False)
    monkeypatch.delenv("NANOINFER_KERNELS", raising=False)

    def no_build():
        raise AssertionError("the kernels were built on a machine they must not run on")

    monkeypatch.setattr(kernels_module, "_build", no_build)


@pytest.mark.parametrize("machine", ["aarch64", "arm64", "ppc64le", ""])
def test_off_when_not_x86_64(fresh_load, monkeypatch, caplog, machine: str) -> None:
    monkeypatch.setattr(kernels_module.platform, "machine", lambda: machine)
    monkeypatch.setattr(kernels_module, "cpu_flags", lambda: kernels_module.REQUIRED_CPU_FLAGS)
    with caplog.at_level(logging.WARNING, logger="nanoinfer.kernels"):
        assert kernels() is None
        assert kernels() is None  # decided once: one message only
    messages = [r.getMessage() for r in caplog.records if r.name == "nanoinfer.kernels"]
    assert len(messages) == 1 and "x86-64" in messages[0] and "\n" not in messages[0]


@pytest.mark.parametrize(
    "flags, missing",
    [
        ({"sse2", "avx", "fma", "f16c"}, "avx2"),  # e.g. Sandy Bridge class, or a VM that masks AVX2
        ({"sse2", "avx", "avx2", "f16c"}, "fma"),
        ({"sse2", "avx", "avx2", "fma"}, "f16c"),
        (set(), "/proc/cpuinfo"),  # flags unreadable: not Linux
    ],
)
def test_off_without_the_instructions(fresh_load, monkeypatch, caplog, flags, missing: str) -> None:
    monkeypatch.setattr(kernels_module.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(kernels_module, "cpu_flags", lambda: frozenset(flags))
    with caplog.at_level(logging.WARNING, logger="nanoinfer.kernels"):
        assert kernels() is None
    assert missing in caplog.text


def test_switched_off_by_environment(fresh_load, monkeypatch) -> None:
    monkeypatch.setenv("NANOINFER_KERNELS", "0")
    monkeypatch.setattr(kernels_module.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(kernels_module, "cpu_flags", lambda: kernels_module.REQUIRED_CPU_FLAGS)
    assert kernels() is None


def test_cpu_flags_read_on_linux() -> None:
    flags = kernels_module.cpu_flags()
    if kernels_module.platform.system() == "Linux" and kernels_module.platform.machine() == "x86_64":
        assert "sse2" in flags  # every x86-64 CPU has it
    else:
        assert isinstance(flags, frozenset)
