"""A bounded soak of `nanoinfer serve`: rounds of concurrent streaming chat clients, then the
server must be idle again with its memory bounded.

    python -m nanoinfer.bench.soak [--rounds 3] [--clients 64] [--deadline 300]     # or: make soak

Starts `nanoinfer serve` on a free loopback port. Each round runs --clients streaming chat
requests at once: a third hang up after a random number of events, --never-read clients open
their stream and read nothing for a few seconds before closing, the rest read to [DONE]. Prompts
vary in length, max_tokens is 16-64. Afterwards /metrics must show no running or waiting request
and no KV block in use, and the server's RSS (after warm-up vs. at the end) must not grow by more
than --rss-bound-mb. Exits 1 when any check fails (an HTTP 5xx, an in-band SSE error or a client
transport error among them), and stops the server with SIGTERM, reporting its exit code.
Everything is bounded: one overall --deadline, and a timeout on every request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

FILLER = (
    "the cache keeps keys and values of every token so that decoding one more token reads them "
    "instead of recomputing attention over the whole prompt each step"
)
WORDS = FILLER.split()
TOPICS = [
    "Explain what a KV cache is.",
    "Write a haiku about servers.",
    "List three prime numbers.",
    "Summarize the text above.",
    "What is continuous batching?",
    "Translate 'good morning' to French.",
]
REQUEST_TIMEOUT_S = 60.0
RESERVE_S = 45.0  # of the deadline, kept for waiting until idle and for the SIGTERM shutdown
HOLD_S = (2.0, 4.0)  # how long a never-reading client keeps its stream open


@dataclass
class Tally:
    """What the clients saw, over all rounds."""

    served: int = 0  # HTTP 200 answers (whatever the client then did with the stream)
    completed: int = 0  # streams read to [DONE]
    hung_up: int = 0  # streams closed early on purpose
    never_read: int = 0  # streams opened and closed unread
    statuses: Counter[int] = field(default_factory=Counter)  # non-200 answers
    sse_errors: Counter[str] = field(default_factory=Counter)  # in-band {"error": ...} events
    transport: Counter[str] = field(default_factory=Counter)  # exceptions on the client side
    seconds: list[float] = field(default_factory=list)  # per finished client of the current round

    @property
    def failures(self) -> int:
        return (
            sum(n for s, n in self.statuses.items() if s >= 500)
            + sum(self.sse_errors.values())
            + sum(self.transport.values())
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m nanoinfer.bench.soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=None, help="nanoinfer serve --model (default: the built-in default)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=64, help="concurrent streaming clients per round")
    p.add_argument("--never-read", type=int, default=4, help="clients per round that never read their stream")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--rss-bound-mb", type=float, default=300.0, help="allowed RSS growth, start to end")
    p.add_argument("--deadline", type=float, default=300.0, help="seconds for the whole soak, model load included")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    """VmRSS of `pid` in MiB, from /proc."""
    match = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    assert match, f"no VmRSS for pid {pid}"
    return int(match.group(1)) / 1024


def metrics(base: str) -> dict[str, float]:
    """The un-labelled samples of /metrics, by name."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^([\w:]+) (\S+)$", text, re.MULTILINE)}


def chat_body(rng: random.Random, max_tokens: int) -> dict[str, object]:
    """A streamed chat request: a prompt of 0-80 filler words before a question."""
    filler = " ".join(rng.choice(WORDS) for _ in range(rng.choice([0, 5, 20, 40, 80])))
    return {
        "messages": [{"role": "user", "content": f"{filler}\n\n{rng.choice(TOPICS)}".strip()}],
        "max_tokens": max_tokens,
        "temperature": 0.8,
        "seed": rng.randrange(1 << 30),
        "stream": True,
    }


async def one_client(client: httpx.AsyncClient, role: str, rng: random.Random, tally: Tally) -> None:
    """One streaming request; `role` is full (read to [DONE]), hangup (stop after some events) or idle."""
    max_tokens = rng.randint(16, 64)
    stop_after = rng.randint(1, max_tokens)  # events a hanging-up client reads (the first holds no text)
    t0 = time.monotonic()
    try:
        async with client.stream("POST", "/v1/chat/completions", json=chat_body(rng, max_tokens)) as response:
            if response.status_code != 200:
                tally.statuses[response.status_code] += 1
                return
            tally.served += 1
            if role == "idle":  # open, read nothing, hold it, close
                await asyncio.sleep(rng.uniform(*HOLD_S))
                tally.never_read += 1
                return
            events = 0
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    tally.completed += 1
                    return
                payload = json.loads(data)
                if "error" in payload:
                    tally.sse_errors[f"{payload['error'].get('code')}: {payload['error'].get('message')}"] += 1
                events += 1
                if role == "hangup" and events >= stop_after:
                    tally.hung_up += 1
                    return  # leaving the block closes the connection mid-stream
            tally.transport["stream ended without [DONE]"] += 1
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        tally.transport[type(e).__name__] += 1
    finally:
        tally.seconds.append(time.monotonic() - t0)


async def one_round(base: str, args: argparse.Namespace, rng: random.Random, tally: Tally, budget: float) -> None:
    """All clients of one round at once; whatever is still running after `budget` seconds is cancelled."""
    n_hangup = args.clients // 3
    roles = ["idle"] * args.never_read + ["hangup"] * n_hangup
    roles += ["full"] * (args.clients - len(roles))
    rng.shuffle(roles)
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=httpx.Timeout(REQUEST_TIMEOUT_S)) as client:
        tasks = [asyncio.create_task(one_client(client, role, random.Random(rng.random()), tally)) for role in roles]
        _, pending = await asyncio.wait(tasks, timeout=max(budget, 1.0))
        for task in pending:
            task.cancel()
        if pending:
            tally.transport["cut off by the round's time budget"] += len(pending)
            await asyncio.gather(*pending, return_exceptions=True)


def wait_idle(base: str, timeout: float) -> dict[str, float]:
    """Poll /metrics until nothing runs, waits or holds a block, or `timeout` passes; the last sample."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(base)
        idle = all(
            m.get(f"nanoinfer:{k}", -1) == 0
            for k in ("num_requests_running", "num_requests_waiting", "kv_cache_blocks_used")
        )
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.2)


def start_server(args: argparse.Namespace, port: int, log: Path) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "nanoinfer.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-num-seqs",
        str(args.max_num_seqs),
        "--max-model-len",
        str(args.max_model_len),
        "--shutdown-timeout",
        "10",
    ]
    if args.model:
        cmd += ["--model", args.model]
    print("$", " ".join(cmd[1:]), flush=True)
    with log.open("wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)


def wait_healthy(base: str, proc: subprocess.Popen[bytes], deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise TimeoutError("the server did not become healthy before the deadline")


def stop_server(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM, then up to 30 s to drain and exit; SIGKILL after that (reported as -9)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def soak(args: argparse.Namespace, base: str, pid: int, deadline: float) -> list[str]:
    """The rounds and the checks; returns the failed checks."""
    rng = random.Random(args.seed)
    warm = httpx.post(
        f"{base}/v1/chat/completions",
        timeout=REQUEST_TIMEOUT_S,
        json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8},
    )
    warm.raise_for_status()
    rss_start = rss_mb(pid)
    print(f"RSS after warm-up: {rss_start:.1f} MiB", flush=True)
    tally = Tally()
    for r in range(args.rounds):
        # An equal share of what is left, less time kept for the idle wait and shutdown.
        budget = (deadline - time.monotonic() - RESERVE_S) / (args.rounds - r)
        if budget <= 5:
            return [f"the deadline left no time for round {r + 1} of {args.rounds}"]
        t0 = time.monotonic()
        tally.seconds.clear()
        asyncio.run(one_round(base, args, rng, tally, budget))
        took = sorted(tally.seconds) or [0.0]
        print(
            f"round {r + 1}/{args.rounds}: {time.monotonic() - t0:.1f} s (per client: median "
            f"{took[len(took) // 2]:.1f} s, max {took[-1]:.1f} s), served so far {tally.served}, "
            f"RSS {rss_mb(pid):.1f} MiB, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
            flush=True,
        )
    final = wait_idle(base, timeout=min(30.0, max(deadline - time.monotonic() - 35, 1.0)))
    rss_end = rss_mb(pid)
    growth = rss_end - rss_start

    print(f"\nrequests served (HTTP 200): {tally.served} of {args.rounds * args.clients}")
    print(f"  read to [DONE]: {tally.completed}, hung up early: {tally.hung_up}, never read: {tally.never_read}")
    print(f"errors by HTTP status: {dict(tally.statuses) or 'none'}")
    print(f"in-band SSE errors: {dict(tally.sse_errors) or 'none'}")
    print(f"client transport errors: {dict(tally.transport) or 'none'}")
    print(
        f"server RSS: {rss_start:.1f} MiB after warm-up -> {rss_end:.1f} MiB at the end "
        f"(growth {growth:+.1f} MiB; bound {args.rss_bound_mb:.0f} MiB)"
    )
    failed = []
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_blocks_used"):
        value = final.get(f"nanoinfer:{name}")
        print(f"/metrics nanoinfer:{name} = {value}")
        if value != 0:
            failed.append(f"nanoinfer:{name} is {value}, not 0, after the server should be idle")
    if growth > args.rss_bound_mb:
        failed.append(f"RSS grew by {growth:.1f} MiB, over the bound of {args.rss_bound_mb:.0f} MiB")
    if tally.failures:
        failed.append(f"{tally.failures} 5xx answers, in-band errors or client transport errors")
    return failed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    deadline = time.monotonic() + args.deadline
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = Path(tempfile.gettempdir()) / f"nanoinfer-soak-{os.getpid()}.log"
    proc = start_server(args, port, log)
    failed: list[str] = []
    try:
        wait_healthy(base, proc, deadline)
        failed = soak(args, base, proc.pid, deadline)
    except Exception as e:  # noqa: BLE001 -- whatever went wrong, stop the server and report it
        failed.append(f"{type(e).__name__}: {e}")
    finally:
        code = stop_server(proc)
    print(f"server exit code after SIGTERM: {code} (log: {log})")
    if code != 0:
        failed.append(f"the server exited with {code}")
    for line in failed:
        print("FAILED:", line)
    print("soak passed" if not failed else "soak FAILED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
