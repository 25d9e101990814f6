"""The HTTP routes: OpenAI chat and completions, /tokenize and /detokenize, /health and /metrics.

Work that can take long on a big input (tokenizing, chat templates, detokenizing) runs in a
worker thread, so /health and every open stream keep answering meanwhile.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from nanoinfer.adapters.serving import LoRARequest
from nanoinfer.engine.engine import LLMEngine
from nanoinfer.errors import RequestError
from nanoinfer.server.convert import (
    chat_job,
    chat_prompt,
    chat_response,
    completion_job,
    completion_response,
    prompt_texts,
)
from nanoinfer.server.errors import ERROR_RESPONSES, APIError
from nanoinfer.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    HealthStatus,
    LoadLoRAAdapterRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    UnloadLoRAAdapterRequest,
)
from nanoinfer.server.state import ServerState
from nanoinfer.server.streaming import (
    EventStreamResponse,
    chat_stream,
    completion_stream,
    final_outputs,
    merged_outputs,
)
from nanoinfer.server.token_text import TokenTexts


def _state(request: Request) -> ServerState:
    """The ServerState of the app serving this request."""
    return request.app.state.server


def _answers(model: type, streams: bool = False) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses of a route whose handler returns a plain Response: its 200 body (JSON, or
    server-sent events when the request asks to stream)."""
    # Each server-sent event carries one JSON chunk in `data` (then a last "[DONE]").
    event = {"type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"]}
    content = {"text/event-stream": {"schema": event}} if streams else {}
    return {200: {"model": model, "content": content}}


def _pieces(engine: LLMEngine, ids: list[int]) -> list[str]:
    """Each token's piece as the vocabulary spells it (vLLM's token_strs)."""
    return [engine.tokenizer.id_to_token(i) or "" for i in ids]


# Success of the adapter routes is a line of text, as vLLM answers; errors stay JSON.
_TEXT_ANSWER: dict[int | str, dict[str, Any]] = {200: {"content": {"text/plain": {"schema": {"type": "string"}}}}}


def api_router() -> APIRouter:
    """The OpenAI routes plus /tokenize and /detokenize (behind the API key when one is set)."""
    router = APIRouter(responses=ERROR_RESPONSES)

    @router.get("/v1/models")
    async def models(request: Request) -> ModelList:
        state = _state(request)
        max_len = state.engine.max_model_len if state.engine is not None else None
        base = ModelCard(id=state.served_model_name, max_model_len=max_len, root=state.config.model)
        adapters = [
            ModelCard(id=name, max_model_len=max_len, root=lora.lora_path, parent=state.served_model_name)
            for name, lora in list(state.loras.items())
        ]
        return ModelList(data=[base, *adapters])

    @router.post("/v1/load_lora_adapter", response_model=None, responses=_TEXT_ANSWER)
    async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request) -> Response:
        state = _state(request)
        engine, async_engine = state.ready()
        if engine.lora is None:
            raise APIError(400, "this server serves no LoRA adapters: start it with --enable-lora", param="lora_name")
        if body.lora_name in state.loras or body.lora_name == state.served_model_name:
            raise APIError(400, f"the name {body.lora_name!r} is already in use", param="lora_name")
        lora = LoRARequest(
            body.lora_name, max((x.lora_int_id for x in state.loras.values()), default=0) + 1, body.lora_path
        )
        try:
            # Every replica's, where there are several (a replica that missed an adapter would
            # still load it on its first request that names it).
            await asyncio.wrap_future(async_engine.call_each(lambda replica: replica.add_lora(lora)))
        except RequestError as e:
            # A replica that did load it forgets it: its id will be handed out again.
            await asyncio.wrap_future(async_engine.call_each(lambda replica: replica.remove_lora(lora.lora_int_id)))
            raise APIError(400, str(e), param="lora_path") from None
        state.loras[body.lora_name] = lora
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @router.post("/v1/unload_lora_adapter", response_model=None, responses=_TEXT_ANSWER)
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, request: Request) -> Response:
        state = _state(request)
        _, async_engine = state.ready()
        lora = state.loras.get(body.lora_name)
        if lora is None:
            raise APIError(404, f"no LoRA adapter named {body.lora_name!r} is loaded", param="lora_name")
        try:
            await asyncio.wrap_future(async_engine.call_each(lambda replica: replica.remove_lora(lora.lora_int_id)))
        except RequestError as e:
            raise APIError(400, str(e), param="lora_name") from None
        del state.loras[body.lora_name]
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @router.post("/v1/chat/completions", response_model=None, responses=_answers(ChatCompletionResponse, True))
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        state = _state(request)
        engine, async_engine = state.ready()
        lora = state.check_model(body.model)
        parser = state.config.tool_call_parser
        job = await asyncio.to_thread(chat_job, engine, body.model or state.served_model_name, body, parser)
        job.lora_request = lora
        job = state.admit(job)
        texts = TokenTexts(engine.tokenizer, as_ids=body.return_tokens_as_token_ids)
        top = body.top_logprobs if body.logprobs else None
        if job.stream:
            return EventStreamResponse(chat_stream(job, merged_outputs(async_engine, job), texts, top))
        finals = await final_outputs(request, async_engine, job)
        if finals is None:
            return Response(status_code=499)  # nobody is listening any more
        return JSONResponse(chat_response(job, finals, texts, top).model_dump())

    @router.post("/v1/completions", response_model=None, responses=_answers(CompletionResponse, True))
    async def completions(body: CompletionRequest, request: Request) -> Response:
        state = _state(request)
        engine, async_engine = state.ready()
        lora = state.check_model(body.model)
        job = await asyncio.to_thread(completion_job, engine, body.model or state.served_model_name, body)
        job.lora_request = lora
        job = state.admit(job)
        texts = TokenTexts(engine.tokenizer, as_ids=body.return_tokens_as_token_ids)
        echo = await asyncio.to_thread(prompt_texts, engine, body, job) if body.echo else None
        want_logprobs = body.logprobs is not None
        if job.stream:
            return EventStreamResponse(
                completion_stream(job, merged_outputs(async_engine, job), texts, echo, want_logprobs)
            )
        finals = await final_outputs(request, async_engine, job)
        if finals is None:
            return Response(status_code=499)
        return JSONResponse(completion_response(job, finals, texts, echo, want_logprobs).model_dump())

    @router.post("/tokenize", response_model=None, responses=_answers(TokenizeResponse))
    async def tokenize(body: TokenizeRequest, request: Request) -> Response:
        state = _state(request)
        engine, _ = state.ready()
        state.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send exactly one of `prompt` or `messages`")
        if body.messages is not None:
            if not body.messages:
                raise APIError(400, "messages must not be empty", param="messages")
            tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
            ids = await asyncio.to_thread(chat_prompt, engine, body.messages, body.add_generation_prompt, tools)
        else:
            text = body.prompt or ""
            limit = engine.config.limits.max_prompt_chars
            if len(text) > limit:
                raise APIError(
                    400, f"the prompt has {len(text)} characters, over this server's limit of {limit}", param="prompt"
                )
            ids = await asyncio.to_thread(engine.tokenizer.encode, text, body.add_special_tokens)
        strs = await asyncio.to_thread(_pieces, engine, ids) if body.return_token_strs else None
        # Serialized in a worker too: half a million ids take the event loop tens of milliseconds.
        payload = TokenizeResponse(tokens=ids, count=len(ids), max_model_len=engine.max_model_len, token_strs=strs)
        return Response(await asyncio.to_thread(payload.model_dump_json), media_type="application/json")

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
        state = _state(request)
        engine, _ = state.ready()
        state.check_model(body.model)
        vocab = engine.model_config.vocab_size
        bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is out of range for a vocabulary of {vocab}", param="tokens")
        text = await asyncio.to_thread(engine.tokenizer.decode, body.tokens)
        strs = await asyncio.to_thread(_pieces, engine, body.tokens) if body.return_token_strs else None
        return DetokenizeResponse(prompt=text, token_strs=strs)

    return router


def open_router() -> APIRouter:
    """/health and /metrics: they answer without an API key and never wait for the engine thread."""
    router = APIRouter()

    @router.get("/health", responses={200: {"model": HealthStatus}, 503: {"model": HealthStatus}})
    async def health(request: Request) -> JSONResponse:
        status, body = _state(request).health()
        return JSONResponse(body, status_code=status)

    @router.get("/metrics", response_class=PlainTextResponse, responses={503: {"model": ErrorResponse}})
    async def metrics(request: Request) -> Response:
        return Response(_state(request).metrics(), media_type=CONTENT_TYPE_LATEST)

    return router
