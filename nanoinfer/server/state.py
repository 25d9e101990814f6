"""ServerConfig (what `nanoinfer serve` is asked to do) and ServerState (what the routes share)."""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from nanoinfer.adapters.serving import LoRARequest
from nanoinfer.engine.async_engine import AsyncEngine, EngineClient
from nanoinfer.engine.data_parallel import DataParallelEngine, render_metrics
from nanoinfer.engine.engine import LLMEngine
from nanoinfer.errors import NanoInferError
from nanoinfer.server.convert import Job
from nanoinfer.server.errors import APIError, as_api_error
from nanoinfer.server.tool_parsers import TOOL_CALL_PARSERS

log = logging.getLogger("nanoinfer.server")

PREFIX_CACHE_ISOLATION = ("shared", "salt")


@dataclass(frozen=True)
class ServerConfig:
    """Deployment settings of the HTTP server; the engine's own knobs live in EngineConfig."""

    model: str
    served_model_name: str | None = None  # None: the model argument
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_request_bytes: int = 8 << 20  # bodies over this get 413 before they are parsed
    # Sequences that may wait beyond the running batch before new requests get 503 (None: 4 x max_num_seqs).
    max_waiting_requests: int | None = None
    request_timeout: float | None = None  # seconds; a request's own `timeout` may only shorten it
    shutdown_timeout: float = 30.0  # on SIGTERM: how long running requests may finish
    # shared: every request may reuse every cached prefix, so TTFT and usage.cached_tokens can tell a
    # caller that someone sent the same prefix before. salt: only requests that send the same
    # cache_salt share; one without a salt shares with nobody (slower, private).
    prefix_cache_isolation: str = "shared"
    chat_template: str | None = None  # Jinja source used instead of the model's own chat template
    lora_modules: tuple[tuple[str, str], ...] = ()  # (name, PEFT directory) served from the start
    tool_call_parser: str | None = None  # the model's tool-call format (None: read from the template)

    def __post_init__(self) -> None:
        if self.prefix_cache_isolation not in PREFIX_CACHE_ISOLATION:
            raise ValueError(f"prefix_cache_isolation must be one of {', '.join(PREFIX_CACHE_ISOLATION)}")
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(f"tool_call_parser must be one of {', '.join(TOOL_CALL_PARSERS)}")
        for name in ("max_request_bytes", "max_waiting_requests", "request_timeout", "shutdown_timeout"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r}")

    @property
    def name(self) -> str:
        return self.served_model_name or self.model


@dataclass
class ServerState:
    """The engine (once loaded) and what every route needs to know about the deployment.

    With data parallelism `engines` holds every replica, `engine` is replica 0 (what routes read
    the tokenizer, configs and limits from, alike in all) and `async_engine` the router."""

    config: ServerConfig
    engine: LLMEngine | None = None
    async_engine: EngineClient | None = None
    engines: list[LLMEngine] = dataclasses.field(default_factory=list)
    load_error: str | None = None
    draining: bool = False  # shutting down: running requests finish, new ones get 503
    # Adapters clients may name in `model`; the server's own registry, so lookups on the event
    # loop never read the engine's state while its thread changes it.
    loras: dict[str, LoRARequest] = dataclasses.field(default_factory=dict)

    @property
    def served_model_name(self) -> str:
        return self.config.name

    def attach(self, engine: LLMEngine | Sequence[LLMEngine]) -> None:
        """Start serving `engine`, or replicas of one behind a router: loop threads begin here."""
        engines = [engine] if isinstance(engine, LLMEngine) else list(engine)
        first = engines[0]
        for e in engines:
            if self.config.chat_template is not None:
                e.tokenizer.set_chat_template(self.config.chat_template)
        for name, path in self.config.lora_modules:
            self.loras[name] = LoRARequest(name, len(self.loras) + 1, path)
        for e in engines:
            for lora in self.loras.values():  # before the loop threads start
                e.add_lora(lora)
        max_seqs = first.config.max_num_seqs
        waiting = self.config.max_waiting_requests or 4 * max_seqs
        if len(engines) == 1:
            self.async_engine = AsyncEngine(first, max_outstanding_seqs=max_seqs + waiting)
        else:
            # The waiting allowance is the server's: shared out over the replicas.
            share = -(-waiting // len(engines))
            self.async_engine = DataParallelEngine.start(engines, max_outstanding_seqs=max_seqs + share)
        self.engines = engines
        self.engine = first

    def load(self, loader: Callable[[], LLMEngine | Sequence[LLMEngine]]) -> None:
        """Run the loader (in a background thread); remember why it failed, if it does."""
        try:
            self.attach(loader())
            log.info("model %s is ready", self.served_model_name)
        except Exception as e:
            self.load_error = f"{type(e).__name__}: {e}"
            # Our own errors carry a message meant for a person; anything else deserves its traceback.
            if isinstance(e, NanoInferError):
                log.error("loading the model failed: %s", e)
            else:
                log.exception("loading the model failed")

    def loaded(self) -> tuple[LLMEngine, EngineClient]:
        """The engine, or a 503 while it is loading (or failed to load)."""
        if self.engine is None or self.async_engine is None:
            why = f"the model failed to load: {self.load_error}" if self.load_error else "the model is still loading"
            raise APIError(503, why, "service_unavailable")
        return self.engine, self.async_engine

    def ready(self) -> tuple[LLMEngine, EngineClient]:
        """The engine if it can take new work; else a 503 saying why (loading, shutting down, dead)."""
        engine, async_engine = self.loaded()
        if self.draining:
            raise APIError(503, "the server is shutting down", "service_unavailable")
        dead = async_engine.health()
        if dead is not None:
            raise APIError(503, f"the engine is not serving: {dead}", "service_unavailable")
        return engine, async_engine

    def health(self) -> tuple[int, dict[str, Any]]:
        """/health: 200 only while the engine loop is alive and coming round."""
        if self.engine is None or self.async_engine is None:
            return 503, {"status": "failed", "error": self.load_error} if self.load_error else {"status": "loading"}
        if self.draining:
            return 503, {"status": "draining"}
        dead = self.async_engine.health()
        return (503, {"status": "unhealthy", "error": dead}) if dead else (200, {"status": "ok"})

    def metrics(self) -> bytes:
        """/metrics: the engine's, or every replica's and their totals; 503 until loaded."""
        self.loaded()
        # The engine threads refresh the gauges after every step and every idle wait.
        return render_metrics(self.engines)

    def check_model(self, name: str | None) -> LoRARequest | None:
        """The adapter a request's `model` names (None: the base model); 404 for an unknown name."""
        if name is None or name == self.served_model_name:
            return None
        if name in self.loras:
            return self.loras[name]
        known = ", ".join([self.served_model_name, *self.loras])
        raise APIError(
            404,
            f"The model `{name}` does not exist; this server serves: {known}.",
            param="model",
            code="model_not_found",
        )

    def admit(self, job: Job) -> Job:
        """Apply the deployment's policies to a validated job; 503 with Retry-After when the queue is full."""
        # Checked again, not only at the route's start: tokenizing ran meanwhile (seconds for a huge
        # prompt), and a drain or a dead engine since then must still turn the request away.
        _, async_engine = self.ready()
        try:
            async_engine.check_capacity(job.num_seqs)
        except NanoInferError as e:
            raise as_api_error(e) from None
        salt = job.cache_salt
        if salt is None and self.config.prefix_cache_isolation == "salt":
            salt = f"private-{uuid.uuid4().hex}"  # shares with nobody
        timeout = min((t for t in (job.timeout, self.config.request_timeout) if t is not None), default=None)
        return dataclasses.replace(job, cache_salt=salt, timeout=timeout)

    def drain(self, timeout: float) -> None:
        """Stop taking requests, let running ones finish for up to `timeout` s, then abort the rest."""
        self.draining = True
        if self.async_engine is None:
            return
        deadline = time.monotonic() + timeout
        while self.async_engine.num_outstanding_seqs and time.monotonic() < deadline:
            time.sleep(0.05)
        left = self.async_engine.num_outstanding_seqs
        if left:
            log.warning("shutdown: aborting %d sequences still running after %g s", left, timeout)
            self.async_engine.abort_all("the server is shutting down").result(timeout=10)

    def shutdown(self) -> None:
        """Stop the engine loop thread."""
        if self.async_engine is not None:
            self.async_engine.shutdown()
