"""The `nanoinfer` command line: run, chat (piped), inspect, --help, and one clear line per bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest


def nanoinfer(*args: str, stdin: str | None = None, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nanoinfer.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return str(tiny_model("llama")[0])


def test_help_for_every_subcommand():
    assert nanoinfer("--help").returncode == 0
    for sub in ("run", "chat", "inspect", "serve"):
        result = nanoinfer(sub, "--help")
        assert result.returncode == 0 and "--model" in result.stdout


def test_run_streams_and_reports_stats(model_dir):
    result = nanoinfer("run", "--model", model_dir, "--max-tokens", "8", "--temperature", "0", "-v", "Hello world")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "prompt tokens" in result.stderr and "decode" in result.stderr and "time to first token" in result.stderr


def test_run_speculative_reports_acceptance(model_dir):
    plain = nanoinfer("run", "--model", model_dir, "--max-tokens", "24", "--temperature", "0", "--raw", "a b a b a b a")
    spec_config = json.dumps({"method": "ngram", "num_speculative_tokens": 3})
    args = ("run", "--model", model_dir, "--max-tokens", "24", "--temperature", "0", "--raw", "-v")
    result = nanoinfer(*args, "--speculative-config", spec_config, "a b a b a b a")
    assert result.returncode == 0, result.stderr
    assert result.stdout == plain.stdout  # greedy output unchanged
    assert "[spec] draft tokens:" in result.stderr and "mean tokens per target forward:" in result.stderr
    bad = nanoinfer(*args, "--speculative-config", "{not json", "hi")
    assert bad.returncode == 1 and "speculative-config" in bad.stderr


def test_run_seed_reproducible(model_dir):
    args = ("run", "--model", model_dir, "--max-tokens", "10", "--temperature", "1.0", "--seed", "3", "--raw", "Hi")
    assert nanoinfer(*args).stdout == nanoinfer(*args).stdout


def test_chat_with_piped_stdin_keeps_history(model_dir):
    result = nanoinfer(
        "chat", "--model", model_dir, "--max-tokens", "4", "--system", "Be brief.", stdin="Hello there\nAnd again\n"
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) >= 1


def test_inspect_prints_tree_params_config_and_tokens(model_dir):
    result = nanoinfer("inspect", "--model", model_dir, "--tokens", "Hello world")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Transformer(" in out and "qkv_proj" in out and "parameters:" in out
    assert "num_kv_heads: 2" in out and "tokens (" in out
    # the tiny llama: 2 x 2 layers x 2 KV heads x 16 x 2 bytes
    assert "KV cache per token = 2 (K and V) x 2 layers x 2 KV heads x 16 head_dim x bytes:" in out
    assert "float16: 256 bytes" in out and "float32: 512 bytes" in out


def _assert_clean_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_error_missing_path(tmp_path):
    _assert_clean_error(nanoinfer("run", "--model", str(tmp_path / "nope"), "hi"), "not found")


def test_error_directory_without_config(tmp_path):
    _assert_clean_error(nanoinfer("run", "--model", str(tmp_path), "hi"), "config.json")


def test_error_truncated_safetensors(model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    _assert_clean_error(nanoinfer("run", "--model", str(broken), "hi"), "safetensors")


def test_error_unsupported_architecture(model_dir, tmp_path):
    odd = tmp_path / "odd"
    shutil.copytree(model_dir, odd)
    config = json.loads((odd / "config.json").read_text())
    config["model_type"] = "falcon"
    (odd / "config.json").write_text(json.dumps(config))
    _assert_clean_error(nanoinfer("run", "--model", str(odd), "hi"), "falcon", "llama", "gemma3")


def test_error_shape_mismatch(model_dir, tmp_path):
    odd = tmp_path / "odd"
    shutil.copytree(model_dir, odd)
    config = json.loads((odd / "config.json").read_text())
    config["intermediate_size"] = 96
    (odd / "config.json").write_text(json.dumps(config))
    _assert_clean_error(nanoinfer("run", "--model", str(odd), "hi"), "shape")


def test_error_bad_sampling_value(model_dir):
    _assert_clean_error(nanoinfer("run", "--model", model_dir, "--temperature", "-1", "hi"), "temperature")
