"""AsyncEngine: the engine loop in a background thread, with one asyncio stream per request.

The LLMEngine is single-threaded; every call into it (add, abort, step) happens on the loop
thread. Callers hand over commands through a queue and get results back as futures, so a
request that fails validation raises in its caller and never disturbs the loop.

The loop must outlive anything a request or a client does: a cancelled future, a failing step or
a vanished event loop fails the requests concerned, never the thread. Should the thread end all
the same, `health()` says why, and every waiting and new caller gets EngineDeadError at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from nanoinfer.adapters.serving import LoRARequest
from nanoinfer.engine.engine import LLMEngine
from nanoinfer.errors import EngineDeadError, EngineOverloadedError, NanoInferError
from nanoinfer.outputs import RequestOutput
from nanoinfer.sampling_params import SamplingParams

log = logging.getLogger(__name__)

# Outputs one stream may hold unread before its client counts as gone: with DELTA outputs that is
# one item per step, so 4096 is minutes of tokens, yet a few MB at most.
DEFAULT_MAX_PENDING_OUTPUTS = 4096
# An engine loop that has not come round for this long is reported unhealthy (a step of a full
# 2048-token batch takes seconds on two cores, not a minute).
DEFAULT_STALL_SECONDS = 60.0
_IDLE_WAIT = 0.5  # the loop's heartbeat while idle


class RequestFailedError(NanoInferError):
    """The engine failed one request's work (a bug, reported with its cause); others go on."""


@dataclass
class _Stream:
    """Where one request's outputs go: a queue read on the caller's event loop."""

    loop: asyncio.AbstractEventLoop
    items: asyncio.Queue = field(default_factory=asyncio.Queue)
    overflowed: bool = False


class EngineClient(Protocol):
    """What the server and LLM use of an AsyncEngine; a DataParallelEngine offers the same."""

    @property
    def num_outstanding_seqs(self) -> int: ...

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future: ...

    def call_each(self, fn: Callable[[LLMEngine], Any]) -> concurrent.futures.Future: ...

    def health(self) -> str | None: ...

    def check_capacity(self, num_seqs: int) -> None: ...

    def generate(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        cache_salt: str | None = None,
        lora_request: LoRARequest | None = None,
    ) -> AsyncGenerator[RequestOutput, None]: ...

    def abort_all(self, reason: str) -> concurrent.futures.Future: ...

    def shutdown(self) -> None: ...


class AsyncEngine:
    def __init__(
        self,
        engine: LLMEngine,
        max_outstanding_seqs: int | None = None,
        max_pending_outputs: int = DEFAULT_MAX_PENDING_OUTPUTS,
        stall_seconds: float = DEFAULT_STALL_SECONDS,
    ):
        self.engine = engine
        # Sequences admitted (running or waiting) before new requests get EngineOverloadedError.
        self.max_outstanding_seqs = max_outstanding_seqs
        self.max_pending_outputs = max_pending_outputs
        self.stall_seconds = stall_seconds
        self._commands: queue.Queue[tuple[Callable[[], Any], concurrent.futures.Future]] = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._outstanding = 0  # sequences of requests between generate()'s start and end
        self._count_lock = threading.Lock()
        self._stop = threading.Event()
        self.dead: str | None = None  # why the loop stopped, once it has
        self._heartbeat = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="nanoinfer-engine", daemon=True)
        self._thread.start()

    # ---- called from any thread -------------------------------------------------------------

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run fn on the engine thread between steps; its result or exception lands in the future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self.dead is not None:
            future.set_exception(EngineDeadError(self.dead))
            return future
        self._commands.put((fn, future))
        return future

    def call_each(self, fn: Callable[[LLMEngine], Any]) -> concurrent.futures.Future:
        """Run fn(engine) on the engine thread; the future holds [its result] (as
        DataParallelEngine.call_each holds one per replica)."""
        return self.call(lambda: [fn(self.engine)])

    def health(self) -> str | None:
        """None while the loop is alive and came round recently; else why not. Never blocks."""
        if self.dead is not None:
            return self.dead
        if not self._thread.is_alive():
            return "the engine thread has stopped"
        stalled = time.monotonic() - self._heartbeat
        if stalled > self.stall_seconds:
            return f"the engine loop has made no progress for {stalled:.0f} s"
        return None

    @property
    def num_outstanding_seqs(self) -> int:
        """Sequences of requests accepted and not yet finished (running or waiting)."""
        return self._outstanding

    def check_capacity(self, num_seqs: int) -> None:
        """Raise EngineDeadError or EngineOverloadedError unless `num_seqs` more sequences fit now."""
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        limit = self.max_outstanding_seqs
        if limit is not None and self._outstanding + num_seqs > limit:
            raise EngineOverloadedError(
                f"the server is busy: {self._outstanding} sequences are running or waiting (limit {limit}); retry later"
            )

    async def generate(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        cache_salt: str | None = None,
        lora_request: LoRARequest | None = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Stream outputs of one request; leaving early (client gone, cancelled) aborts it."""
        self.check_capacity(params.n)
        stream = _Stream(asyncio.get_running_loop())
        self._streams[request_id] = stream
        self._count(params.n)
        finished = False
        try:
            add = self.call(lambda: self.engine.add_request(request_id, prompt, params, cache_salt, lora_request))
            await asyncio.wrap_future(add)
            while True:
                item = await stream.items.get()
                if isinstance(item, BaseException):
                    raise item
                if item.error is not None:
                    finished = True  # the engine has dropped it already
                    raise RequestFailedError(f"the request failed inside the engine: {item.error}")
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._count(-params.n)
            self._streams.pop(request_id, None)
            if not finished:
                self.call(lambda: self.engine.abort(request_id))

    def abort_all(self, reason: str) -> concurrent.futures.Future:
        """Abort every request in the engine; their streams end with EngineDeadError(reason)."""
        return self.call(lambda: self._fail_requests(list(self.engine.requests), EngineDeadError(reason)))

    def shutdown(self) -> None:
        """Stop the loop thread (requests still in the engine are dropped with it)."""
        self._stop.set()
        self._commands.put((lambda: None, concurrent.futures.Future()))
        self._thread.join(timeout=5)
        self.engine.shutdown()

    def _count(self, delta: int) -> None:
        with self._count_lock:
            self._outstanding += delta

    # ---- the loop thread --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._heartbeat = time.monotonic()
                self._iteration()
        except BaseException as e:  # noqa: BLE001 - whatever ends the loop must be told to everyone
            self.dead = f"the engine loop stopped: {type(e).__name__}: {e}"
            log.exception("engine loop stopped")
        else:
            self.dead = "the engine has shut down"
        self._fail_everything(EngineDeadError(self.dead))

    def _iteration(self) -> None:
        """Take commands (waiting for one when idle), then run one step if there is work."""
        self._drain_commands(block=not self.engine.has_unfinished_requests())
        if not self.engine.has_unfinished_requests():
            self.engine.update_metrics()  # aborts and idleness change the gauges too
            return
        try:
            outputs = self.engine.step()
        except Exception as e:  # noqa: BLE001 - a failed step fails the requests in it, not the loop
            log.exception("engine step failed")
            error = RequestFailedError(f"engine error: {type(e).__name__}: {e}")
            self._fail_requests(self.engine.last_step_requests, error)
            return
        self._deliver_step(outputs)

    def _drain_commands(self, block: bool) -> None:
        try:
            wait = min(_IDLE_WAIT, self.stall_seconds / 4)  # beat well inside the stall limit
            item = self._commands.get(timeout=wait) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._execute(*item)
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return

    @staticmethod
    def _execute(fn: Callable[[], Any], future: concurrent.futures.Future) -> None:
        """Run one command unless its caller gave up on it (a cancelled future takes no result)."""
        if not future.set_running_or_notify_cancel():
            return
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - the caller gets it
            future.set_exception(e)
        else:
            future.set_result(result)

    def _deliver_step(self, outputs: list[RequestOutput]) -> None:
        """A step's outputs, one wake-up per event loop: each `call_soon_threadsafe` writes to the
        loop's self-pipe, a syscall that wakes the loop's thread while this one still needs the
        CPU. One per request cost about 5% of the output rate at 64 streams (docs/performance.md,
        "Serving over HTTP")."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[str, _Stream, RequestOutput]]] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                batches.setdefault(stream.loop, []).append((out.request_id, stream, out))
        for loop, batch in batches.items():
            try:
                loop.call_soon_threadsafe(self._put_batch, batch)
            except RuntimeError:  # that event loop is closed: nobody will read these requests any more
                for request_id, _, _ in batch:
                    self.engine.abort(request_id)

    def _put_batch(self, batch: list[tuple[str, _Stream, RequestOutput]]) -> None:
        for request_id, stream, item in batch:
            self._put(request_id, stream, item)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return
        try:
            stream.loop.call_soon_threadsafe(self._put, request_id, stream, item)
        except RuntimeError:  # that event loop is closed: nobody will read this request any more
            self.engine.abort(request_id)

    def _put(self, request_id: str, stream: _Stream, item: RequestOutput | BaseException) -> None:
        """On the caller's loop: queue an output, or drop a request whose reader fell too far behind."""
        if stream.overflowed:
            return
        if stream.items.qsize() >= self.max_pending_outputs and not isinstance(item, BaseException):
            stream.overflowed = True
            self.call(lambda: self.engine.abort(request_id))
            item = RequestFailedError(
                f"the client read nothing for {self.max_pending_outputs} outputs; request aborted"
            )
        stream.items.put_nowait(item)

    def _fail_requests(self, request_ids: list[str], error: Exception) -> None:
        """Abort these requests; their streams end with `error`."""
        for request_id in request_ids:
            try:
                self.engine.abort(request_id)
            except Exception:  # noqa: BLE001 - keep failing the others
                log.exception("aborting %s failed", request_id)
            self._deliver(request_id, error)

    def _fail_everything(self, error: EngineDeadError) -> None:
        """After the loop ended: every command and every open stream gets `error`."""
        while True:
            try:
                _, future = self._commands.get_nowait()
            except queue.Empty:
                break
            if future.set_running_or_notify_cancel():
                future.set_exception(error)
        for request_id in list(self._streams):
            self._deliver(request_id, error)
