"""A non-editable install works on its own: the package, its C kernel source and its commands,
with no source checkout to fall back on.

The project is installed (pip, no network, no build isolation) into a fresh venv under tmp whose
only view of torch and the other dependencies is a .pth line naming this interpreter's
site-packages. A .pth line only adds a directory to sys.path; the .pth files inside it are not run,
so the editable nanoinfer installed there stays invisible. Everything runs from a working
directory outside the checkout, since Python puts the working directory on sys.path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest

from nanoinfer.kernels import find_compiler, unsupported_reason

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # one pip build (~10 s) and a few interpreter starts with torch

# What a checkout holds that an install must not depend on (or that would only slow the copy).
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis"
)


@dataclass
class Installed:
    venv: Path
    python: Path
    elsewhere: Path  # a working directory outside the checkout
    env: dict[str, str]

    def run(self, *args: str | Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(a) for a in args], cwd=self.elsewhere, env=self.env, capture_output=True, text=True, timeout=300
        )


def _dependency_dirs() -> list[str]:
    """This interpreter's site-packages, where torch and the other dependencies are."""
    return sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("install")
    # Build from a copy: pip builds in the source tree, and setuptools' build/ and egg-info must
    # not land in a checkout that others use meanwhile.
    source = root / "source"
    shutil.copytree(REPO, source, ignore=NOT_SOURCE)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(site) / "nanoinfer_test_deps.pth").write_text("".join(d + "\n" for d in _dependency_dirs()))
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "NANOINFER_", "VIRTUAL_ENV"))}
    env.update(
        NANOINFER_CACHE=str(root / "cache"),
        NANOINFER_KERNELS="1",
        PYTHONNOUSERSITE="1",
        PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
    )
    # pip comes from the .pth'd site-packages too. It sees the editable nanoinfer's metadata there
    # but never uninstalls outside its own environment (sys.prefix: the tmp venv).
    result = subprocess.run(
        [
            python,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--no-cache-dir",
            "--disable-pip-version-check",
            "-q",
            str(source),
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return Installed(venv, python, elsewhere, env)


def test_installed_package_is_the_copy_in_the_venv(installed: Installed) -> None:
    result = installed.run(installed.python, "-c", "import nanoinfer; print(nanoinfer.__file__)")
    assert result.returncode == 0, result.stderr
    location = Path(result.stdout.strip()).resolve()
    assert location.is_relative_to(installed.venv.resolve()) and not location.is_relative_to(REPO), location
    assert (location.parent / "kernels" / "cpu_kernels.c").is_file()  # package data went along


@pytest.mark.skipif(
    find_compiler() is None or unsupported_reason() is not None,
    reason="the C kernels are not built here (no compiler, or not x86-64 with AVX2/FMA/F16C)",
)
def test_kernels_load_from_the_install(installed: Installed) -> None:
    code = "from nanoinfer.kernels import kernels; k = kernels(); assert k is not None; print(k.path)"
    result = installed.run(installed.python, "-c", code)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).parent == Path(installed.env["NANOINFER_CACHE"]) / "kernels"


def test_cli_help(installed: Installed) -> None:
    result = installed.run(installed.venv / "bin" / "nanoinfer", "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: nanoinfer" in result.stdout


def test_bench_help_outside_checkout(installed: Installed) -> None:
    result = installed.run(installed.venv / "bin" / "nanoinfer", "bench", "--help")
    assert result.returncode == 0, result.stderr
    assert "--concurrency" in result.stdout


def test_bench_data_is_installed(installed: Installed) -> None:
    code = "from nanoinfer.bench.quality import TEXT; print(TEXT.is_file())"
    result = installed.run(installed.venv / "bin" / "python", "-c", code)
    assert result.stdout.strip() == "True", result.stderr
