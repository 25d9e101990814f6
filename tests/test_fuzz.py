"""Property-based API fuzzing with schemathesis: every operation of the live app's /openapi.json.

The app runs in-process on 127.0.0.1 with SmolLM2 and a small context window, so any generated
request finishes fast. For each operation schemathesis sends schema-derived requests, valid and
invalid, and checks that none gets a 5xx, that every status code and body is one the schema
declares, and (our own check) that no request makes the server log an unhandled exception.

Examples per operation come from NANOINFER_FUZZ_EXAMPLES (default 15); `make fuzz` runs 300.
Failures here are server bugs to fix in the server (or its schema): nothing is skipped.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
import uvicorn
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from server_utils import free_socket

from nanoinfer.config import EngineConfig, RequestLimits
from nanoinfer.engine.engine import LLMEngine
from nanoinfer.server.app import ServerConfig, create_app

MODEL = "smollm2-135m-instruct"
KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
EXAMPLES = int(os.environ.get("NANOINFER_FUZZ_EXAMPLES", "15"))
# A request may ask for max_tokens up to the window, and n choices of it: keep both small.
MAX_MODEL_LEN = 128
LIMITS = RequestLimits(max_n=4, max_choices=8)
REQUEST_TIMEOUT_S = 60  # per request; a longer one is a hang, reported as a failure
SCHEMA_CHECKS = [status_code_conformance, content_type_conformance, response_schema_conformance]


def _published_schema() -> dict[str, Any]:
    """The app's /openapi.json, read at collection time from an app without a model: the routes,
    and so the schema, do not depend on the engine (the live server's copy is compared below)."""
    app = create_app(None, ServerConfig(model=MODEL, api_key=KEY))
    with TestClient(app) as client:
        response = client.get("/openapi.json", headers=AUTH)
    response.raise_for_status()
    return response.json()


PUBLISHED = _published_schema()
# Sanitizing off: reports show the request exactly as sent.
schema = schemathesis.openapi.from_dict(
    PUBLISHED, config=schemathesis.Config.from_dict({"output": {"sanitization": {"enabled": False}}})
)


class _ErrorLog(logging.Handler):
    """Collects ERROR records of the server's loggers: uvicorn logs unhandled exceptions there."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def take(self) -> list[str]:
        taken, self.records = self.records, []
        return [self.format(r) for r in taken]


@pytest.fixture(scope="module")
def live() -> Iterator[tuple[str, _ErrorLog]]:
    """The app on a free loopback port, its model loaded, plus the collector of its error logs."""
    engine = LLMEngine(MODEL, EngineConfig(max_model_len=MAX_MODEL_LEN, max_num_seqs=8, limits=LIMITS))
    app = create_app(engine, ServerConfig(model=MODEL, api_key=KEY))
    sock = free_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    errors = _ErrorLog()
    errors.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    # After uvicorn.Config: it reconfigures its loggers, dropping handlers added before.
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "nanoinfer.server")]
    for logger in loggers:
        logger.addHandler(errors)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not (server.started and httpx.get(f"{url}/health").status_code == 200):
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    assert httpx.get(f"{url}/openapi.json", headers=AUTH).json() == PUBLISHED, "the live app publishes another schema"
    yield url, errors
    server.should_exit = True
    thread.join(10)
    for logger in loggers:
        logger.removeHandler(errors)


FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))


# Three properties, each its own test so that one failing early does not hide the others: a
# schemathesis test stops at its first failing case.


@FUZZ
@schema.parametrize()
def test_no_server_error(case: schemathesis.Case, live: tuple[str, _ErrorLog]) -> None:
    """No request, however malformed, gets a 5xx."""
    url, _ = live
    case.call_and_validate(base_url=url, headers=AUTH, checks=[not_a_server_error], timeout=REQUEST_TIMEOUT_S)


@FUZZ
@schema.parametrize()
def test_no_unhandled_exception_logged(case: schemathesis.Case, live: tuple[str, _ErrorLog]) -> None:
    """An error answered with a 4xx is the caller's: the server must not log it as a crash."""
    url, errors = live
    errors.take()  # start clean: nothing logged by an earlier case counts against this one
    response = case.call(base_url=url, headers=AUTH, timeout=REQUEST_TIMEOUT_S)
    logged = errors.take()
    assert not logged, (
        f"{case.method} {case.path} {case.body!r} -> {response.status_code} {response.text[:300]}\n"
        "made the server log:\n" + "\n".join(logged)
    )


# What this found first, all fixed in the server's schema: undeclared 400/401/404/408/413/503 error
# bodies (422 declared, never sent), /metrics declared JSON, streams and the generation routes'
# 200 bodies undeclared, a 405 without Allow.
@FUZZ
@schema.parametrize()
def test_responses_match_schema(case: schemathesis.Case, live: tuple[str, _ErrorLog]) -> None:
    """Every status code, content type and body is one the published schema declares."""
    url, _ = live
    case.call_and_validate(base_url=url, headers=AUTH, checks=SCHEMA_CHECKS, timeout=REQUEST_TIMEOUT_S)


# Requests random generation seldom gets entirely right (a stream among them): their answers too
# must be what the schema declares.
HELLO = [{"role": "user", "content": "Name three colors."}]
VALID: dict[str, tuple[str, Any]] = {
    "chat": ("/v1/chat/completions", {"messages": HELLO, "max_tokens": 4}),
    "chat-stream": ("/v1/chat/completions", {"messages": HELLO, "max_tokens": 4, "stream": True}),
    "completion": ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 4}),
    "completion-stream": ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 4, "stream": True}),
}


@pytest.mark.parametrize("name", VALID)
def test_valid_requests_match_schema(name: str, live: tuple[str, _ErrorLog]) -> None:
    url, _ = live
    path, body = VALID[name]
    case = schema[path]["POST"].Case(body=body)
    response = case.call_and_validate(base_url=url, headers=AUTH, checks=SCHEMA_CHECKS, timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == 200
