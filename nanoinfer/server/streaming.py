"""Running a Job on the AsyncEngine: its engine requests merged into one stream, SSE framing,
whole answers, timeouts, and aborting everything when the client goes away."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from nanoinfer.engine.async_engine import EngineClient
from nanoinfer.outputs import RequestOutput
from nanoinfer.server.convert import Job, chat_logprobs, completion_logprobs
from nanoinfer.server.errors import as_api_error
from nanoinfer.server.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    CompletionChoice,
    CompletionResponse,
    PromptTokensDetails,
    Usage,
)
from nanoinfer.server.token_text import TokenTexts
from nanoinfer.server.tools import finish_reason

log = logging.getLogger("nanoinfer.server")


Outputs = AsyncGenerator[tuple[int, RequestOutput], None]  # (prompt index, output), closed with aclose()


async def merged_outputs(async_engine: EngineClient, job: Job) -> Outputs:
    """(prompt index, output) from every engine request of the job as they arrive.

    Each engine request is pumped by its own task; closing this generator cancels them, and a
    cancelled AsyncEngine.generate aborts its request. Past job.timeout it raises TimeoutError.
    """
    # Bounded, and filled with an awaited put: a reader that stops reading stops the pumps, so the
    # engine's per-request queue fills and AsyncEngine aborts the request (memory stays bounded).
    queue: asyncio.Queue[tuple[int, RequestOutput | Exception]] = asyncio.Queue(maxsize=len(job.prompts) + 1)
    deadline = None if job.timeout is None else time.monotonic() + job.timeout

    async def pump(i: int) -> None:
        try:
            rid, prompt, params = f"{job.id}-{i}", job.prompts[i], job.params[i]
            async for out in async_engine.generate(rid, prompt, params, job.cache_salt, job.lora_request):
                await queue.put((i, out))
        except Exception as e:  # CancelledError is not an Exception: cancellation passes through
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i)) for i in range(len(job.prompts))]
    try:
        remaining = len(tasks)
        while remaining:
            wait = None if deadline is None else max(deadline - time.monotonic(), 0)
            try:
                i, item = await asyncio.wait_for(queue.get(), wait)
            except asyncio.TimeoutError:
                raise TimeoutError(f"the request did not finish within its timeout of {job.timeout:g} s") from None
            if isinstance(item, Exception):
                raise item
            yield i, item
            remaining -= item.finished
    finally:
        for task in tasks:
            task.cancel()


async def _until_disconnected(request: Request) -> None:
    """Return once the client has gone (the body was already read, so only disconnect remains)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def final_outputs(request: Request, async_engine: EngineClient, job: Job) -> dict[int, RequestOutput] | None:
    """Run the job to the end; None (with its requests aborted) if the client disconnects first."""

    async def consume() -> dict[int, RequestOutput]:
        finals = {}
        stream = merged_outputs(async_engine, job)
        try:
            async for i, out in stream:
                if out.finished:
                    finals[i] = out
        finally:
            await stream.aclose()
        return finals

    work = asyncio.create_task(consume())
    watch = asyncio.create_task(_until_disconnected(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()  # closes the merged stream, which aborts the engine requests
    return work.result() if work.done() and not work.cancelled() else None


# ---- streaming ------------------------------------------------------------------------------


@dataclass
class Delta:
    """What one choice gained since the previous output."""

    index: int  # choice index over the whole request: prompt index * n + engine choice index
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None  # set exactly once per choice


@dataclass
class DeltaTracker:
    """Numbers the engine's DELTA outputs across the job's prompts and keeps usage counts."""

    n: int
    completion_tokens: int = 0
    cached: dict[int, int] = field(default_factory=dict)

    def deltas(self, prompt_index: int, out: RequestOutput) -> list[Delta]:
        """Increments of every choice in `out` (the engine sends only choices that changed)."""
        self.cached[prompt_index] = out.num_cached_tokens
        result = []
        for c in out.outputs:
            self.completion_tokens += len(c.token_ids)
            result.append(Delta(prompt_index * self.n + c.index, c.text, c.token_ids, c.logprobs, c.finish_reason))
        return result

    def usage(self, job: Job) -> Usage:
        prompt = sum(len(ids) for ids in job.prompts)
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=self.completion_tokens,
            total_tokens=prompt + self.completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(self.cached.values())),
        )


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event carrying a JSON payload."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _chunk_json(chunk: ChatCompletionChunk | CompletionResponse) -> str:
    """One SSE event for a streamed chunk; `usage` appears only on the final usage chunk, as OpenAI streams it."""
    return f"data: {chunk.model_dump_json(exclude={'usage'} if chunk.usage is None else None)}\n\n"


async def _events(
    job: Job, outputs: Outputs, first: list[str], render: Callable[[Delta], str], usage_chunk: Callable[[Usage], str]
) -> AsyncIterator[str]:
    """The SSE body shared by chat and completions: chunks, optional usage chunk, then [DONE]."""
    tracker = DeltaTracker(job.n)
    try:
        # The opening chunks (chat's role, an echo) go out with the first output, as vLLM sends
        # them: clients that time the first chunk as the first token (vllm bench serve) then do.
        async for i, out in outputs:
            for event in first:
                yield event
            first = []
            for delta in tracker.deltas(i, out):
                yield render(delta)
        if job.include_usage:
            yield usage_chunk(tracker.usage(job))
    except Exception as e:  # the status line is sent already: report in-band, as OpenAI does
        error = as_api_error(e)
        if error.type == "internal_error":  # a bug deserves its traceback; a 503 or 408 does not
            log.error("stream %s failed", job.id, exc_info=e)
        yield sse(
            {
                "error": {
                    "message": error.message,
                    "type": error.type,
                    "param": error.param,
                    "code": error.code if error.code is not None else error.status,
                }
            }
        )
    finally:
        await outputs.aclose()
    yield "data: [DONE]\n\n"


class EventStreamResponse(StreamingResponse):
    """SSE response that always closes its event generator, so a vanished client aborts its requests."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]  # Starlette types it AsyncIterable


def chat_stream(job: Job, outputs: Outputs, texts: TokenTexts, top: int | None) -> AsyncIterator[str]:
    """SSE events of a streamed chat completion: role chunks, content chunks, usage, [DONE]."""

    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        return _chunk_json(ChatCompletionChunk(id=job.id, model=job.model, choices=choices, usage=usage))

    calls = {i: job.tool_call_stream() for i in range(job.num_seqs)}  # per choice; None: plain content

    def render(d: Delta) -> str:
        logprobs = chat_logprobs(texts, d.token_ids, d.logprobs, top or 0) if d.logprobs is not None else None
        stream = calls[d.index]
        if stream is None:
            deltas = [{"content": d.text}]
        else:  # content and tool-call pieces; a step may make several, or none yet
            deltas = stream.feed(d.text) + (stream.close() if d.finish_reason is not None else [])
            if not deltas and (logprobs is not None or d.finish_reason is not None):
                deltas = [{}]
        pieces = []
        for k, delta in enumerate(deltas):
            last = k == len(deltas) - 1
            pieces.append(
                ChatChunkChoice(
                    index=d.index,
                    delta=delta,
                    logprobs=logprobs if k == 0 else None,
                    finish_reason=finish_reason(d.finish_reason, stream) if last else None,
                )
            )
        return "".join(chunk([piece]) for piece in pieces)

    first = [chunk([ChatChunkChoice(index=i, delta={"role": "assistant", "content": ""})]) for i in range(job.n)]
    return _events(job, outputs, first, render, lambda usage: chunk([], usage))


def completion_stream(
    job: Job, outputs: Outputs, texts: TokenTexts, echo: list[str] | None, want_logprobs: bool
) -> AsyncIterator[str]:
    """SSE events of a streamed completion; echo sends the prompt as each choice's first chunk."""
    offsets: dict[int, int] = {}  # text_offset continues across chunks of one choice

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        return _chunk_json(
            CompletionResponse(id=job.id, object="text_completion", model=job.model, choices=choices, usage=usage)
        )

    def render(d: Delta) -> str:
        logprobs = None
        if want_logprobs and d.logprobs is not None:
            logprobs = completion_logprobs(texts, d.token_ids, list(d.logprobs), offsets.get(d.index, 0))
        offsets[d.index] = offsets.get(d.index, 0) + len(d.text)
        return chunk([CompletionChoice(index=d.index, text=d.text, logprobs=logprobs, finish_reason=d.finish_reason)])

    first = []
    if echo:
        for i in range(job.num_seqs):
            offsets[i] = len(echo[i // job.n])
            first.append(chunk([CompletionChoice(index=i, text=echo[i // job.n])]))
    return _events(job, outputs, first, render, lambda usage: chunk([], usage))
