"""OpenAI requests -> engine work, and engine outputs -> OpenAI response bodies.

Building a Job tokenizes and renders chat templates, which can take a second on a large prompt:
the routes run `chat_job`/`completion_job` in a worker thread, never on the event loop.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from nanoinfer.adapters.serving import LoRARequest
from nanoinfer.engine.engine import LLMEngine
from nanoinfer.outputs import RequestOutput
from nanoinfer.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams
from nanoinfer.server.errors import APIError
from nanoinfer.server.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatResponseMessage,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    PromptTokensDetails,
    SamplingFields,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from nanoinfer.server.token_text import MIN_LOGPROB, TokenTexts, clamp
from nanoinfer.server.tools import (
    ToolCallStream,
    ToolUse,
    check_parameters,
    finish_reason,
    parse_answer,
    template_messages,
    tool_call_stream,
    tool_use,
)


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
    cache_salt: str | None = None
    timeout: float | None = None  # seconds from submission; None: no limit
    tools: ToolUse | None = None  # chat requests with tools: how the answers are read
    lora_request: LoRARequest | None = None  # the adapter the request's `model` names

    def tool_call_stream(self) -> ToolCallStream | None:
        """A fresh reader of one choice's tool calls; None when answers are plain content."""
        return tool_call_stream(self.tools)

    @property
    def num_seqs(self) -> int:
        return len(self.prompts) * self.n


# ---- requests -------------------------------------------------------------------------------


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """JSON object keys are strings: turn them into token ids."""
    if bias is None:
        return None
    try:
        return {int(k): v for k, v in bias.items()}
    except ValueError:
        raise APIError(400, f"logit_bias keys must be token ids, got {list(bias)[:8]!r}", param="logit_bias") from None


def _max_tokens(requested: int | None, prompt_len: int, max_model_len: int) -> int:
    """The generation budget: what was asked if it fits, else the rest of the context window."""
    if requested is None:
        return max(max_model_len - prompt_len, 1)  # a prompt that fills the window fails validation
    if prompt_len < max_model_len and prompt_len + requested > max_model_len:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the "
            f"completion). Please reduce the prompt or max_tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return requested


def _structured_outputs(body: SamplingFields) -> StructuredOutputsParams | None:
    """The request's output constraint: vLLM's structured_outputs, or OpenAI's response_format."""
    fmt = getattr(body, "response_format", None)
    wanted = body.structured_outputs
    if fmt is not None and fmt.type != "text":
        if wanted is not None:
            raise APIError(400, "give response_format or structured_outputs, not both", param="response_format")
        if fmt.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if fmt.json_schema is None or fmt.json_schema.json_schema is None:
            raise APIError(400, "response_format json_schema needs json_schema.schema", param="response_format")
        return StructuredOutputsParams(json=fmt.json_schema.json_schema)
    if wanted is None:
        return None
    return StructuredOutputsParams(
        json=wanted.json_schema,
        regex=wanted.regex,
        choice=wanted.choice,
        grammar=wanted.grammar,
        json_object=bool(wanted.json_object),
    )


def _sampling_params(
    engine: LLMEngine,
    body: SamplingFields,
    ids: list[int],
    requested: int | None,
    logprobs: int | None,
    tools: ToolUse | None = None,
) -> SamplingParams:
    """SamplingParams from the request over the model's defaults, validated with the prompt by the engine."""
    constraint = tools.constraint() if tools is not None else None
    params = SamplingParams.from_request(
        defaults=engine.generation,
        n=body.n,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        repetition_penalty=body.repetition_penalty,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        seed=body.seed,
        stop=body.stop,
        stop_token_ids=body.stop_token_ids,
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
        logit_bias=_logit_bias(body.logit_bias),
        skip_special_tokens=body.skip_special_tokens and not (tools is not None and tools.keeps_special_tokens),
        include_stop_str_in_output=body.include_stop_str_in_output,
        max_tokens=_max_tokens(requested, len(ids), engine.max_model_len),
        # Streams take only what is new each step; whole answers wait for the end.
        output_kind=RequestOutputKind.DELTA if body.stream else RequestOutputKind.FINAL_ONLY,
        structured_outputs=constraint or _structured_outputs(body),
    )
    engine.validate_request(ids, params)
    return params


def _check_common(body: SamplingFields) -> None:
    if body.stream_options is not None and not body.stream:  # as OpenAI does
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")


def _check_chars(engine: LLMEngine, count: int, param: str) -> None:
    """Refuse text too long to tokenize before spending time on it."""
    limit = engine.config.limits.max_prompt_chars
    if count > limit:
        raise APIError(400, f"the prompt has {count} characters, over this server's limit of {limit}", param=param)


def message_dicts(engine: LLMEngine, messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template wants them (content flattened to one string), within the limits."""
    limits = engine.config.limits
    if len(messages) > limits.max_messages:
        raise APIError(
            400, f"{len(messages)} messages exceed this server's limit of {limits.max_messages}", param="messages"
        )
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
        if m.tool_calls is not None:
            if m.role != "assistant":
                raise APIError(400, f"messages[{i}]: only assistant messages carry tool_calls", param="messages")
            message["tool_calls"] = [call.model_dump() for call in m.tool_calls]
        if m.role == "tool":
            if m.tool_call_id is None:
                raise APIError(
                    400, f"messages[{i}]: a tool message needs the tool_call_id it answers", param="messages"
                )
            message["tool_call_id"] = m.tool_call_id
        out.append(message)
    template_messages(out)
    _check_chars(engine, sum(map(_message_chars, out)), "messages")
    return out


def _message_chars(message: dict[str, Any]) -> int:
    calls = message.get("tool_calls") or []
    arguments = sum(len(json.dumps(c["function"]["arguments"], ensure_ascii=False)) for c in calls)
    return len(message["content"]) + len(message["role"]) + arguments


def chat_prompt(
    engine: LLMEngine,
    messages: list[ChatMessage],
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """Token ids of the messages (and tools) rendered by the model's chat template."""
    return engine.tokenizer.apply_chat_template(
        message_dicts(engine, messages), add_generation_prompt=add_generation_prompt, tokenize=True, tools=tools
    )


def chat_job(engine: LLMEngine, model: str, body: ChatCompletionRequest, tool_call_parser: str | None = None) -> Job:
    """Validate a chat request and turn it into engine work; raises APIError or RequestError.

    `tool_call_parser` names the model's tool-call format (None: read it from the chat template).
    """
    _check_common(body)
    tools = tool_use(body, engine.tokenizer, tool_call_parser)
    if tools is not None:
        check_parameters(tools, engine.structured.grammar)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
    ids = chat_prompt(engine, body.messages, body.add_generation_prompt, tools.tools if tools is not None else None)
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = _sampling_params(engine, body, ids, requested, logprobs, tools)
    return Job(
        f"chatcmpl-{uuid.uuid4().hex}",
        model,
        [ids],
        [params],
        body.n,
        body.stream,
        bool(body.stream_options and body.stream_options.include_usage),
        body.cache_salt,
        body.timeout,
        tools if tools is not None and tools.makes_calls else None,
    )


def _completion_prompts(engine: LLMEngine, prompt: Any) -> list[list[int]]:
    """Text, texts, token ids or lists of token ids -> one token-id list per prompt."""
    if isinstance(prompt, str):
        _check_chars(engine, len(prompt), "prompt")
        return [engine.tokenizer.encode(prompt)]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if isinstance(prompt[0], str):
        _check_chars(engine, sum(map(len, prompt)), "prompt")
        return [engine.tokenizer.encode(p) for p in prompt]
    if isinstance(prompt[0], int):
        return [list(prompt)]
    return [list(p) for p in prompt]


def completion_job(engine: LLMEngine, model: str, body: CompletionRequest) -> Job:
    """Validate a completions request (one engine request per prompt) and turn it into engine work."""
    _check_common(body)
    limit = engine.config.limits.max_choices
    count = (
        len(body.prompt) if isinstance(body.prompt, list) and body.prompt and not isinstance(body.prompt[0], int) else 1
    )
    if count * body.n > limit:
        raise APIError(
            400, f"{count} prompts x n={body.n} exceeds this server's limit of {limit} choices per request", param="n"
        )
    prompts = _completion_prompts(engine, body.prompt)
    params = [_sampling_params(engine, body, ids, body.max_tokens, body.logprobs) for ids in prompts]
    return Job(
        f"cmpl-{uuid.uuid4().hex}",
        model,
        prompts,
        params,
        body.n,
        body.stream,
        bool(body.stream_options and body.stream_options.include_usage),
        body.cache_salt,
        body.timeout,
    )


def prompt_texts(engine: LLMEngine, body: CompletionRequest, job: Job) -> list[str]:
    """What echo prepends: the prompt as sent when it was text, else its decoded tokens."""
    if isinstance(body.prompt, str):
        return [body.prompt]
    if body.prompt and isinstance(body.prompt[0], str):
        return list(body.prompt)
    return [engine.tokenizer.decode(ids) for ids in job.prompts]


# ---- responses ------------------------------------------------------------------------------


def chat_logprobs(texts: TokenTexts, token_ids: list[int], logprobs: list[dict[int, float]], k: int) -> ChatLogprobs:
    """choices[i].logprobs for chat: each chosen token with its k best alternatives."""
    content = []
    for token_id, entry in zip(token_ids, logprobs):
        text, raw = texts(token_id)
        best = sorted(entry.items(), key=lambda kv: -kv[1])[:k]
        top = [TopLogprob(token=texts(t)[0], logprob=clamp(lp), bytes=texts(t)[1]) for t, lp in best]
        content.append(
            TokenLogprob(token=text, logprob=clamp(entry.get(token_id, MIN_LOGPROB)), bytes=raw, top_logprobs=top)
        )
    return ChatLogprobs(content=content)


def completion_logprobs(
    texts: TokenTexts, token_ids: list[int], logprobs: list[dict[int, float] | None], offset: int
) -> CompletionLogprobs:
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
        out.token_logprobs.append(clamp(entry.get(token_id, MIN_LOGPROB)))
        # The legacy API lists the top alternatives plus the sampled token: the engine's entry exactly.
        out.top_logprobs.append({texts(t)[0]: clamp(lp) for t, lp in sorted(entry.items(), key=lambda kv: -kv[1])})
    return out


def usage(job: Job, finals: dict[int, RequestOutput]) -> Usage:
    """Token counts of the whole job, cached prompt tokens included."""
    prompt = sum(len(ids) for ids in job.prompts)
    completion = sum(len(c.token_ids) for out in finals.values() for c in out.outputs)
    cached = sum(out.num_cached_tokens for out in finals.values())
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


def chat_response(
    job: Job, finals: dict[int, RequestOutput], texts: TokenTexts, top: int | None
) -> ChatCompletionResponse:
    """The non-streamed chat.completion body."""
    choices = []
    for out in finals.values():
        for c in out.outputs:
            logprobs = chat_logprobs(texts, c.token_ids, c.logprobs, top or 0) if c.logprobs is not None else None
            calls = job.tool_call_stream()
            content, tool_calls = parse_answer(calls, c.text) if calls is not None else (c.text, [])
            choices.append(
                ChatChoice(
                    index=c.index,
                    message=ChatResponseMessage(content=content, tool_calls=tool_calls or None),
                    logprobs=logprobs,
                    finish_reason=finish_reason(c.finish_reason, calls),
                )
            )
    return ChatCompletionResponse(
        id=job.id, model=job.model, choices=sorted(choices, key=lambda c: c.index), usage=usage(job, finals)
    )


def completion_response(
    job: Job, finals: dict[int, RequestOutput], texts: TokenTexts, echo: list[str] | None, want_logprobs: bool
) -> CompletionResponse:
    """The non-streamed text_completion body (echo and logprobs included)."""
    choices = []
    for i, out in sorted(finals.items()):
        for c in out.outputs:
            prefix = echo[i] if echo else ""
            logprobs = None
            if want_logprobs:
                ids = (job.prompts[i] if echo else []) + c.token_ids
                entries = [None] * (len(ids) - len(c.token_ids)) + list(c.logprobs or [])
                logprobs = completion_logprobs(texts, ids, entries, 0)
            choices.append(
                CompletionChoice(
                    index=i * job.n + c.index, text=prefix + c.text, logprobs=logprobs, finish_reason=c.finish_reason
                )
            )
    return CompletionResponse(
        id=job.id, model=job.model, choices=sorted(choices, key=lambda c: c.index), usage=usage(job, finals)
    )
