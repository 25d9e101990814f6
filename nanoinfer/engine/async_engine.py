"""AsyncEngine: the engine loop in a background thread, with one asyncio stream per request.

The LLMEngine is single-threaded; every call into it (add, abort, step) happens on the loop
thread. Callers hand over commands through a queue and get results back as futures, so a
request that fails validation raises in its caller and never disturbs the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from nanoinfer.engine.engine import LLMEngine
from nanoinfer.outputs import RequestOutput
from nanoinfer.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.Queue[tuple[Callable[[], Any], concurrent.futures.Future]] = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nanoinfer-engine", daemon=True)
        self._thread.start()

    # ---- called from any thread -------------------------------------------------------------

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run fn on the engine thread between steps; its result or exception lands in the future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((fn, future))
        return future

    async def generate(
        self, request_id: str, prompt: str | list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Stream outputs of one request; leaving early (client gone, cancelled) aborts it."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (loop, outputs)
        finished = False
        try:
            await asyncio.wrap_future(self.call(lambda: self.engine.add_request(request_id, prompt, params)))
            while True:
                item = await outputs.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.call(lambda: self.engine.abort(request_id))

    def shutdown(self) -> None:
        self._stop.set()
        self._commands.put((lambda: None, concurrent.futures.Future()))
        self._thread.join(timeout=5)

    # ---- the loop thread --------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            block = not self.engine.has_unfinished_requests()
            self._drain_commands(block)
            if not self.engine.has_unfinished_requests():
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # an engine bug must not kill the loop: fail the live requests
                log.exception("engine step failed")
                self._fail_all(e)
                continue
            for out in outputs:
                self._deliver(out.request_id, out)

    def _drain_commands(self, block: bool) -> None:
        try:
            fn, future = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            try:
                future.set_result(fn())
            except Exception as e:
                future.set_exception(e)
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                return

    def _deliver(self, request_id: str, item: RequestOutput | Exception) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, outputs = stream
            loop.call_soon_threadsafe(outputs.put_nowait, item)

    def _fail_all(self, error: Exception) -> None:
        for request_id in list(self.engine.requests):
            self.engine.abort(request_id)
            self._deliver(request_id, RuntimeError(f"engine error: {error}"))
