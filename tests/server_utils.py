"""Running the app in-process on a loopback port, for the server tests."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import uvicorn
from fastapi import FastAPI

from nanoinfer.server.state import ServerState


@dataclass
class Running:
    url: str
    state: ServerState


def free_socket() -> socket.socket:
    """A bound socket handed to uvicorn, so no other process can take the port in between."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit it: uvicorn leaves Nagle on for sockets handed to it, and with
    # the client's delayed ACK each keep-alive response then waits ~40 ms.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def running(app: FastAPI, ready_timeout: float = 180) -> Iterator[Running]:
    """Serve `app` on 127.0.0.1 until the block ends; waits for /health to answer 200."""
    sock = free_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + ready_timeout
    while not srv.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    while httpx.get(f"{url}/health").status_code != 200:
        assert app.state.server.load_error is None, app.state.server.load_error
        assert time.monotonic() < deadline, "the model did not load"
        time.sleep(0.1)
    try:
        yield Running(url, app.state.server)
    finally:
        srv.should_exit = True
        thread.join(10)


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def wait_idle(server: Running, timeout: float = 10.0) -> None:
    """Within `timeout`: nothing running or waiting, no block held by a request, integrity holds."""
    deadline = time.monotonic() + timeout
    while True:
        busy = {
            name: metric(server.url, f"nanoinfer:{name}")
            for name in ("num_requests_running", "num_requests_waiting", "kv_cache_blocks_used")
        }
        if not any(busy.values()) and server.state.async_engine.num_outstanding_seqs == 0:
            break
        assert time.monotonic() < deadline, f"not idle: {busy}"
        time.sleep(0.05)
    state = server.state
    state.async_engine.call(state.engine.check_integrity).result(timeout=10)
