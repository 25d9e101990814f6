"""OpenAI-compatible HTTP server over one AsyncEngine.

`create_app` builds the FastAPI app (routes, error handlers, API-key check); `serve` runs it
with uvicorn while the model loads in the background, so /health can say 503 until it is ready.
Every request is validated here before it reaches the engine, and every failure becomes an
OpenAI-shaped error body: one bad request never touches the engine loop.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from nanoinfer.engine.async_engine import AsyncEngine
from nanoinfer.engine.engine import LLMEngine
from nanoinfer.errors import ModelLoadError, NanoInferError
from nanoinfer.outputs import RequestOutput
from nanoinfer.sampling_params import SamplingParams
from nanoinfer.server.protocol import (
    MAX_N,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatResponseMessage,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    SamplingFields,
    TokenizeRequest,
    TokenizeResponse,
    TokenLogprob,
    TopLogprob,
    Usage,
)

log = logging.getLogger("nanoinfer.server")

# Paths that answer without an API key: load balancers and Prometheus scrapers carry none.
OPEN_PATHS = {"/health", "/metrics"}
# JSON has no -inf; OpenAI-style APIs clamp impossible tokens to this instead.
MIN_LOGPROB = -9999.0


# ---- errors ---------------------------------------------------------------------------------


class APIError(Exception):
    """An error with its HTTP status, rendered as {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def _error_response(status: int, message: str, type: str, param: str | None = None,
                    code: str | None = None) -> JSONResponse:
    """The JSON error body OpenAI clients expect."""
    body = ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable line from pydantic's error list, plus the first offending field."""
    parts: dict[str, str] = {}
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ())[1:]]  # drop the leading "body"
        if err.get("type") == "json_invalid":
            return f"malformed JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}", None
        if err.get("type") == "missing" and not loc:
            return "the request body is missing", None
        # A union field fails once per alternative: report the field once, with its first complaint.
        where = loc[0] if loc else "body"
        parts.setdefault(where, f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
    return "; ".join(parts.values()) or "invalid request", next(iter(parts), None)


def _install_error_handlers(app: FastAPI) -> None:
    """Map every failure to an OpenAI error body; validation problems are 400, never 422."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return _error_response(400, message, "invalid_request_error", param)

    @app.exception_handler(ValueError)  # RequestError and chat-template errors land here
    async def _bad_value(_: Request, exc: ValueError) -> JSONResponse:
        return _error_response(400, str(exc), "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error_response(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return _error_response(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error")


# ---- server state ---------------------------------------------------------------------------


@dataclass
class ServerState:
    """The engine (once loaded) and what every route needs to know about the deployment."""

    served_model_name: str
    api_key: str | None = None
    engine: LLMEngine | None = None
    async_engine: AsyncEngine | None = None
    load_error: str | None = None

    def attach(self, engine: LLMEngine) -> None:
        """Start serving `engine`: its loop thread begins here."""
        self.async_engine = AsyncEngine(engine)
        self.engine = engine

    def load(self, loader: Callable[[], LLMEngine]) -> None:
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

    def ready(self) -> tuple[LLMEngine, AsyncEngine]:
        """The engine, or a 503 while it is loading (or failed to load)."""
        if self.engine is None or self.async_engine is None:
            why = f"the model failed to load: {self.load_error}" if self.load_error else "the model is still loading"
            raise APIError(503, why, "service_unavailable")
        return self.engine, self.async_engine

    def check_model(self, name: str | None) -> None:
        """404 unless the request names the served model (or none at all)."""
        if name is not None and name != self.served_model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves "
                                f"`{self.served_model_name}`.", param="model", code="model_not_found")

    def shutdown(self) -> None:
        """Stop the engine loop thread."""
        if self.async_engine is not None:
            self.async_engine.shutdown()


def _state(request: Request) -> ServerState:
    """The ServerState of the app serving this request."""
    return request.app.state.server


class _APIKeyMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware): it must not wrap `receive`, or disconnects go unseen."""

    def __init__(self, app: ASGIApp, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = self.state.api_key
        if scope["type"] == "http" and key and scope["path"] not in OPEN_PATHS and not _authorized(scope, key):
            response = _error_response(401, "missing or invalid API key (send `Authorization: Bearer KEY`)",
                                       "authentication_error", code="invalid_api_key")
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _authorized(scope: Scope, key: str) -> bool:
    """True when the request carries `Authorization: Bearer <key>`."""
    header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
    scheme, _, token = header.partition(" ")
    # compare_digest: the time taken must not tell how much of the key was right.
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


# ---- token text for logprobs ----------------------------------------------------------------


def _gpt2_byte_decoder() -> dict[str, int]:
    """Printable character -> byte, the inverse of GPT-2's byte-level BPE alphabet."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shift = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return {c: b for b, c in table.items()}


class TokenTexts:
    """Text and UTF-8 bytes of one token id as OpenAI's logprobs show them (cached per id)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend", None), "decoder", None)
        self.byte_level = "ByteLevel" in repr(decoder)
        self.byte_decoder = _gpt2_byte_decoder()
        self.cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        if token_id not in self.cache:
            raw = self._bytes(token_id)
            self.cache[token_id] = (raw.decode("utf-8", errors="replace"), list(raw))
        return self.cache[token_id]

    def _bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.id_to_token(token_id)
        if piece is None:
            return b""
        if self.byte_level and all(c in self.byte_decoder for c in piece):
            return bytes(self.byte_decoder[c] for c in piece)
        if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:  # SentencePiece byte fallback
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        return piece.replace("\u2581", " ").encode("utf-8")


def _clamp(logprob: float) -> float:
    """A finite logprob (JSON has no -inf)."""
    return max(logprob, MIN_LOGPROB)


def _chat_logprobs(texts: TokenTexts, token_ids: list[int], logprobs: list[dict[int, float]], k: int) -> ChatLogprobs:
    """choices[i].logprobs for chat: each chosen token with its k best alternatives."""
    content = []
    for token_id, entry in zip(token_ids, logprobs):
        text, raw = texts(token_id)
        best = sorted(entry.items(), key=lambda kv: -kv[1])[:k]
        top = [TopLogprob(token=texts(t)[0], logprob=_clamp(lp), bytes=texts(t)[1]) for t, lp in best]
        content.append(TokenLogprob(token=text, logprob=_clamp(entry.get(token_id, MIN_LOGPROB)), bytes=raw,
                                    top_logprobs=top))
    return ChatLogprobs(content=content)


def _completion_logprobs(texts: TokenTexts, token_ids: list[int], logprobs: list[dict[int, float] | None],
                         offset: int) -> CompletionLogprobs:
    """Legacy completions logprobs; `None` entries (echoed prompt tokens) have no logprob."""
    out = CompletionLogprobs()
    for token_id, entry in zip(token_ids, logprobs):
        text = texts(token_id)[0]
        out.tokens.append(text)
        out.text_offset.append(offset)
        offset += len(text)
        if entry is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(_clamp(entry.get(token_id, MIN_LOGPROB)))
        # The legacy API lists the top alternatives plus the sampled token: the engine's entry exactly.
        out.top_logprobs.append({texts(t)[0]: _clamp(lp) for t, lp in sorted(entry.items(), key=lambda kv: -kv[1])})
    return out


# ---- turning a request into engine work -----------------------------------------------------


@dataclass
class Job:
    """Engine work for one HTTP request: one engine request per prompt, n choices each."""

    id: str
    model: str
    prompts: list[list[int]]
    params: list[SamplingParams]
    n: int
    stream: bool
    include_usage: bool


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """JSON object keys are strings: turn them into token ids."""
    if bias is None:
        return None
    try:
        return {int(k): v for k, v in bias.items()}
    except ValueError:
        raise APIError(400, f"logit_bias keys must be token ids, got {list(bias)!r}", param="logit_bias") from None


def _max_tokens(requested: int | None, prompt_len: int, max_model_len: int) -> int:
    """The generation budget: what was asked if it fits, else the rest of the context window."""
    if prompt_len >= max_model_len:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens, but the prompt has "
                            f"{prompt_len} tokens (at least one must remain for the answer). Please shorten it.",
                       code="context_length_exceeded")
    if requested is None:
        return max_model_len - prompt_len
    if prompt_len + requested > max_model_len:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the "
                            f"completion). Please reduce the prompt or max_tokens.",
                       param="max_tokens", code="context_length_exceeded")
    return requested


def _check_prompt(ids: list[int], vocab_size: int) -> None:
    """The engine's own checks, done here so a bad prompt fails before a stream starts."""
    if not ids:
        raise APIError(400, "the prompt is empty: at least one token is needed", param="prompt")
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise APIError(400, f"prompt token id {bad} is out of range for a vocabulary of {vocab_size}", param="prompt")


def _sampling_params(engine: LLMEngine, body: SamplingFields, prompt_len: int, requested: int | None,
                     logprobs: int | None) -> SamplingParams:
    """SamplingParams from the request over the model's generation defaults; RequestError is a 400."""
    params = SamplingParams.from_request(
        defaults=engine.generation,
        n=body.n, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
        repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, seed=body.seed, stop=body.stop,
        stop_token_ids=body.stop_token_ids, ignore_eos=body.ignore_eos, logprobs=logprobs,
        logit_bias=_logit_bias(body.logit_bias), skip_special_tokens=body.skip_special_tokens,
        include_stop_str_in_output=body.include_stop_str_in_output,
        max_tokens=_max_tokens(requested, prompt_len, engine.max_model_len),
    )
    params.check_vocab(engine.model_config.vocab_size)
    return params


def _check_stream_options(body: SamplingFields) -> None:
    """stream_options means nothing without stream: reject it, as OpenAI does."""
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")


def _message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template wants them: content flattened to one string."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            if any(part.type != "text" or part.text is None for part in content):
                raise APIError(400, f"messages[{i}]: only text content parts are supported", param="messages")
            content = "".join(part.text or "" for part in content)
        message: dict[str, Any] = {"role": m.role, "content": content or ""}
        if m.name is not None:
            message["name"] = m.name
        out.append(message)
    return out


def _chat_prompt(engine: LLMEngine, messages: list[ChatMessage], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of the messages rendered by the model's chat template."""
    return engine.tokenizer.apply_chat_template(_message_dicts(messages), add_generation_prompt=add_generation_prompt,
                                                tokenize=True)


def _chat_job(engine: LLMEngine, state: ServerState, body: ChatCompletionRequest) -> Job:
    """Validate a chat request and turn it into engine work; raises APIError or RequestError."""
    state.check_model(body.model)
    _check_stream_options(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
    ids = _chat_prompt(engine, body.messages, body.add_generation_prompt)
    _check_prompt(ids, engine.model_config.vocab_size)
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = _sampling_params(engine, body, len(ids), requested, logprobs)
    return Job(f"chatcmpl-{uuid.uuid4().hex}", state.served_model_name, [ids], [params], body.n, body.stream,
               bool(body.stream_options and body.stream_options.include_usage))


def _completion_prompts(engine: LLMEngine, prompt: Any) -> list[list[int]]:
    """Text, texts, token ids or lists of token ids -> one token-id list per prompt."""
    if isinstance(prompt, str):
        return [engine.tokenizer.encode(prompt)]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if isinstance(prompt[0], str):
        return [engine.tokenizer.encode(p) for p in prompt]
    if isinstance(prompt[0], int):
        return [list(prompt)]
    return [list(p) for p in prompt]


def _completion_job(engine: LLMEngine, state: ServerState, body: CompletionRequest) -> Job:
    """Validate a completions request (one engine request per prompt) and turn it into engine work."""
    state.check_model(body.model)
    _check_stream_options(body)
    prompts = _completion_prompts(engine, body.prompt)
    if len(prompts) * body.n > MAX_N:
        raise APIError(400, f"{len(prompts)} prompts x n={body.n} exceeds {MAX_N} choices per request", param="n")
    params = []
    for ids in prompts:
        _check_prompt(ids, engine.model_config.vocab_size)
        params.append(_sampling_params(engine, body, len(ids), body.max_tokens, body.logprobs))
    return Job(f"cmpl-{uuid.uuid4().hex}", state.served_model_name, prompts, params, body.n, body.stream,
               bool(body.stream_options and body.stream_options.include_usage))


# ---- running it -----------------------------------------------------------------------------


async def _merged_outputs(async_engine: AsyncEngine, job: Job) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from every engine request of the job as they arrive.

    Each engine request is pumped by its own task; closing this generator cancels them, and a
    cancelled AsyncEngine.generate aborts its request.
    """
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            async for out in async_engine.generate(f"{job.id}-{i}", job.prompts[i], job.params[i]):
                queue.put_nowait((i, out))
        except Exception as e:  # CancelledError is not an Exception: cancellation passes through
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i)) for i in range(len(job.prompts))]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
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


async def _final_outputs(request: Request, async_engine: AsyncEngine, job: Job) -> dict[int, RequestOutput] | None:
    """Run the job to the end; None (with its requests aborted) if the client disconnects first."""

    async def consume() -> dict[int, RequestOutput]:
        finals = {}
        stream = _merged_outputs(async_engine, job)
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


def _usage(job: Job, finals: dict[int, RequestOutput]) -> Usage:
    """Token counts of the whole job, cached prompt tokens included."""
    prompt = sum(len(ids) for ids in job.prompts)
    completion = sum(len(c.token_ids) for out in finals.values() for c in out.outputs)
    cached = sum(out.num_cached_tokens for out in finals.values())
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


@dataclass
class Delta:
    """What one choice gained since the previous output."""

    index: int  # choice index over the whole request: prompt index * n + engine choice index
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None  # set exactly once per choice


class DeltaTracker:
    """Turns the engine's cumulative outputs into per-choice increments for streaming."""

    def __init__(self, n: int):
        self.n = n
        self.tokens_sent: dict[int, int] = {}
        self.finished: set[int] = set()
        self.finals: dict[int, RequestOutput] = {}

    def deltas(self, prompt_index: int, out: RequestOutput) -> list[Delta]:
        """Increments of every choice in `out` that gained text, tokens or its finish reason."""
        if out.finished:
            self.finals[prompt_index] = out
        result = []
        for c in out.outputs:
            index = prompt_index * self.n + c.index
            if index in self.finished:
                continue  # finished siblings keep appearing while the others decode
            start = self.tokens_sent.get(index, 0)
            self.tokens_sent[index] = len(c.token_ids)
            finish = c.finish_reason
            if finish is not None:
                self.finished.add(index)
            if c.delta_text or finish is not None or len(c.token_ids) > start:
                logprobs = c.logprobs[start:] if c.logprobs is not None else None
                result.append(Delta(index, c.delta_text, c.token_ids[start:], logprobs, finish))
        return result


def _sse(payload: dict[str, Any]) -> str:
    """One server-sent event carrying a JSON payload."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _chunk_json(chunk: ChatCompletionChunk | CompletionResponse) -> str:
    # `usage` appears only on the final usage chunk, as OpenAI streams it.
    """One SSE event for a streamed chunk."""
    return f"data: {chunk.model_dump_json(exclude={'usage'} if chunk.usage is None else None)}\n\n"


async def _events(job: Job, outputs: AsyncIterator[tuple[int, RequestOutput]], first: list[str],
                  render: Callable[[Delta], str], usage_chunk: Callable[[Usage], str]) -> AsyncIterator[str]:
    """The SSE body shared by chat and completions: chunks, optional usage chunk, then [DONE]."""
    tracker = DeltaTracker(job.n)
    try:
        for event in first:
            yield event
        async for i, out in outputs:
            for delta in tracker.deltas(i, out):
                yield render(delta)
        if job.include_usage:
            yield usage_chunk(_usage(job, tracker.finals))
    except Exception as e:  # the status line is sent already: report in-band, as OpenAI does
        log.exception("stream %s failed", job.id)
        status, kind = (400, "invalid_request_error") if isinstance(e, ValueError) else (500, "internal_error")
        yield _sse({"error": {"message": str(e), "type": kind, "param": None, "code": status}})
    finally:
        await outputs.aclose()  # type: ignore[attr-defined]
    yield "data: [DONE]\n\n"


class EventStreamResponse(StreamingResponse):
    """SSE response that always closes its event generator, so a vanished client aborts its requests."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


# ---- chat completions -----------------------------------------------------------------------


def _chat_response(job: Job, finals: dict[int, RequestOutput], texts: TokenTexts,
                   top: int | None) -> ChatCompletionResponse:
    """The non-streamed chat.completion body."""
    choices = []
    for out in finals.values():
        for c in out.outputs:
            logprobs = _chat_logprobs(texts, c.token_ids, c.logprobs, top or 0) if c.logprobs is not None else None
            choices.append(ChatChoice(index=c.index, message=ChatResponseMessage(content=c.text),
                                      logprobs=logprobs, finish_reason=c.finish_reason))
    return ChatCompletionResponse(id=job.id, model=job.model, choices=sorted(choices, key=lambda c: c.index),
                                  usage=_usage(job, finals))


def _chat_stream(job: Job, outputs: AsyncIterator[tuple[int, RequestOutput]], texts: TokenTexts,
                 top: int | None) -> AsyncIterator[str]:
    """SSE events of a streamed chat completion: role chunks, content chunks, usage, [DONE]."""
    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        return _chunk_json(ChatCompletionChunk(id=job.id, model=job.model, choices=choices, usage=usage))

    def render(d: Delta) -> str:
        logprobs = _chat_logprobs(texts, d.token_ids, d.logprobs, top or 0) if d.logprobs is not None else None
        return chunk([ChatChunkChoice(index=d.index, delta={"content": d.text}, logprobs=logprobs,
                                      finish_reason=d.finish_reason)])

    # The role goes first, before any token exists, so the client sees the stream open at once.
    first = [chunk([ChatChunkChoice(index=i, delta={"role": "assistant", "content": ""})]) for i in range(job.n)]
    return _events(job, outputs, first, render, lambda usage: chunk([], usage))


# ---- completions ----------------------------------------------------------------------------


def _prompt_texts(engine: LLMEngine, body: CompletionRequest, job: Job) -> list[str]:
    """What echo prepends: the prompt as sent when it was text, else its decoded tokens."""
    if isinstance(body.prompt, str):
        return [body.prompt]
    if body.prompt and isinstance(body.prompt[0], str):
        return list(body.prompt)  # type: ignore[arg-type]
    return [engine.tokenizer.decode(ids) for ids in job.prompts]


def _completion_response(job: Job, finals: dict[int, RequestOutput], texts: TokenTexts, echo: list[str] | None,
                         want_logprobs: bool) -> CompletionResponse:
    """The non-streamed text_completion body (echo and logprobs included)."""
    choices = []
    for i, out in sorted(finals.items()):
        for c in out.outputs:
            prefix = echo[i] if echo else ""
            logprobs = None
            if want_logprobs:
                ids = (job.prompts[i] if echo else []) + c.token_ids
                entries = [None] * (len(ids) - len(c.token_ids)) + list(c.logprobs or [])
                logprobs = _completion_logprobs(texts, ids, entries, 0)
            choices.append(CompletionChoice(index=i * job.n + c.index, text=prefix + c.text, logprobs=logprobs,
                                            finish_reason=c.finish_reason))
    return CompletionResponse(id=job.id, model=job.model, choices=sorted(choices, key=lambda c: c.index),
                              usage=_usage(job, finals))


def _completion_stream(job: Job, outputs: AsyncIterator[tuple[int, RequestOutput]], texts: TokenTexts,
                       echo: list[str] | None, want_logprobs: bool) -> AsyncIterator[str]:
    """SSE events of a streamed completion; echo sends the prompt as each choice's first chunk."""
    offsets: dict[int, int] = {}  # text_offset continues across chunks of one choice

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        return _chunk_json(CompletionResponse(id=job.id, object="text_completion", model=job.model,
                                              choices=choices, usage=usage))

    def render(d: Delta) -> str:
        logprobs = None
        if want_logprobs and d.logprobs is not None:
            logprobs = _completion_logprobs(texts, d.token_ids, list(d.logprobs), offsets.get(d.index, 0))
        offsets[d.index] = offsets.get(d.index, 0) + len(d.text)
        return chunk([CompletionChoice(index=d.index, text=d.text, logprobs=logprobs, finish_reason=d.finish_reason)])

    first = []
    if echo:
        for i in range(len(job.prompts) * job.n):
            offsets[i] = len(echo[i // job.n])
            first.append(chunk([CompletionChoice(index=i, text=echo[i // job.n])]))
    return _events(job, outputs, first, render, lambda usage: chunk([], usage))


# ---- routes ---------------------------------------------------------------------------------


def _api_router() -> APIRouter:
    """The OpenAI routes plus /tokenize and /detokenize (behind the API key when one is set)."""
    router = APIRouter()

    @router.get("/v1/models")
    async def models(request: Request) -> ModelList:
        state = _state(request)
        max_len = state.engine.max_model_len if state.engine is not None else None
        return ModelList(data=[ModelCard(id=state.served_model_name, max_model_len=max_len)])

    @router.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        state = _state(request)
        engine, async_engine = state.ready()
        job = _chat_job(engine, state, body)
        texts = TokenTexts(engine.tokenizer)
        top = body.top_logprobs if body.logprobs else None
        if job.stream:
            return EventStreamResponse(_chat_stream(job, _merged_outputs(async_engine, job), texts, top))
        finals = await _final_outputs(request, async_engine, job)
        if finals is None:
            return Response(status_code=499)  # nobody is listening any more
        return JSONResponse(_chat_response(job, finals, texts, top).model_dump())

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        state = _state(request)
        engine, async_engine = state.ready()
        job = _completion_job(engine, state, body)
        texts = TokenTexts(engine.tokenizer)
        echo = _prompt_texts(engine, body, job) if body.echo else None
        want_logprobs = body.logprobs is not None
        if job.stream:
            return EventStreamResponse(_completion_stream(job, _merged_outputs(async_engine, job), texts, echo,
                                                          want_logprobs))
        finals = await _final_outputs(request, async_engine, job)
        if finals is None:
            return Response(status_code=499)
        return JSONResponse(_completion_response(job, finals, texts, echo, want_logprobs).model_dump())

    @router.post("/tokenize")
    async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
        state = _state(request)
        engine, _ = state.ready()
        state.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send exactly one of `prompt` or `messages`")
        if body.messages is not None:
            if not body.messages:
                raise APIError(400, "messages must not be empty", param="messages")
            ids = _chat_prompt(engine, body.messages, body.add_generation_prompt)
        else:
            ids = engine.tokenizer.encode(body.prompt or "", add_special_tokens=body.add_special_tokens)
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=engine.max_model_len)

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
        state = _state(request)
        engine, _ = state.ready()
        state.check_model(body.model)
        vocab = engine.model_config.vocab_size
        bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is out of range for a vocabulary of {vocab}", param="tokens")
        return DetokenizeResponse(prompt=engine.tokenizer.decode(body.tokens))

    return router


def _refresh_metrics(engine: LLMEngine) -> None:
    """On the engine thread: bring gauges and counters up to date (an idle engine does no steps)."""
    engine.update_metrics()


def _open_router() -> APIRouter:
    """/health and /metrics, which answer without an API key."""
    router = APIRouter()

    @router.get("/health")
    async def health(request: Request) -> JSONResponse:
        state = _state(request)
        if state.engine is not None:
            return JSONResponse({"status": "ok"})
        body = {"status": "failed", "error": state.load_error} if state.load_error else {"status": "loading"}
        return JSONResponse(body, status_code=503)

    @router.get("/metrics")
    async def metrics(request: Request) -> Response:
        state = _state(request)
        engine, async_engine = state.ready()
        await asyncio.wrap_future(async_engine.call(lambda: _refresh_metrics(engine)))
        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router


# ---- app and server -------------------------------------------------------------------------


def create_app(engine: LLMEngine | None, served_model_name: str, api_key: str | None = None,
               loader: Callable[[], LLMEngine] | None = None) -> FastAPI:
    """The HTTP app over `engine`, or over what `loader` returns, loaded in a thread at startup."""
    state = ServerState(served_model_name, api_key or None)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if engine is not None:
            state.attach(engine)
        elif loader is not None:
            threading.Thread(target=state.load, args=(loader,), name="nanoinfer-loader", daemon=True).start()
        yield
        state.shutdown()

    app = FastAPI(title="nanoinfer", lifespan=lifespan)
    app.state.server = state
    _install_error_handlers(app)
    app.include_router(_open_router())
    app.include_router(_api_router())
    app.add_middleware(_APIKeyMiddleware, state=state)
    return app


def serve(args: Any, engine_kwargs: dict[str, Any]) -> None:
    """`nanoinfer serve`: answer HTTP at once, load the model meanwhile; raise if loading fails."""
    import uvicorn

    from nanoinfer.config import EngineConfig

    server: uvicorn.Server | None = None

    def load() -> LLMEngine:
        try:
            return LLMEngine(args.model, EngineConfig(dtype=args.dtype, **engine_kwargs))
        except Exception:
            if server is not None:
                server.should_exit = True  # a server that can never answer should not linger
            raise

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")  # uvicorn's look
    name = getattr(args, "served_model_name", None) or args.model
    app = create_app(None, name, getattr(args, "api_key", None), loader=load)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info"))
    server.run()
    error = app.state.server.load_error
    if error:
        raise ModelLoadError(f"cannot serve {args.model}: {error}")
