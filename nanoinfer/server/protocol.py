"""Pydantic models of the OpenAI-compatible HTTP API: what clients send and what they get back.

Request models ignore unknown fields (clients send vendor extras); response models mirror the
OpenAI shapes so the official client parses them.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

# OpenAI's own cap on alternatives per token; SamplingParams enforces the same bound.
MAX_TOP_LOGPROBS = 20


class _Request(BaseModel):
    # JSON's non-standard Infinity/NaN literals parse as floats: refuse them at the door.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class _StrictRequest(_Request):
    """A part of a request whose unknown fields are refused, not ignored: a misspelt tool or
    schema field would otherwise be silently dropped."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# ---- requests -------------------------------------------------------------------------------


class StreamOptions(_Request):
    include_usage: bool = False


class TextPart(_Request):
    """One part of a message's content list; only text parts are supported."""

    type: str
    text: str | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    """A call the assistant made: in a response, and in the history a client sends back."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers


class FunctionDefinition(_StrictRequest):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; none: the function takes no arguments
    # Calls made under tool_choice "required" or a named function always match `parameters`;
    # under "auto" the model's own calls are parsed, not constrained (see the README).
    strict: StrictBool | None = None


class Tool(_StrictRequest):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_StrictRequest):
    name: str


class NamedToolChoice(_StrictRequest):
    type: Literal["function"]
    function: FunctionName


class StructuredOutputsRequest(_StrictRequest):
    """vLLM's structured_outputs: exactly one of these (checked by StructuredOutputsParams)."""

    json_schema: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: StrictBool | None = None


class JsonSchemaFormat(_StrictRequest):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    # "schema" would shadow a BaseModel attribute; the wire name stays "schema".
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(_StrictRequest):
    """OpenAI's response_format: plain text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingFields(_Request):
    """Fields shared by chat and completions requests."""

    # Ranges here are the ones SamplingParams enforces, declared so the OpenAPI schema tells clients.
    model: str | None = None
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: StrictInt | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    stop: str | list[str] | None = None
    stop_token_ids: list[Annotated[StrictInt, Field(ge=0)]] | None = None
    seed: StrictInt | None = None
    n: StrictInt = Field(default=1, ge=1)  # the upper bound is RequestLimits.max_n
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool = False
    skip_special_tokens: StrictBool = True
    include_stop_str_in_output: StrictBool = False
    # vLLM's name: only requests with the same salt share prefix-cache entries.
    cache_salt: str | None = Field(default=None, min_length=1, max_length=256)
    timeout: float | None = Field(default=None, gt=0)  # seconds; the request is aborted after it
    structured_outputs: StructuredOutputsRequest | None = None
    # vLLM's: logprobs name each token "token_id:N" (its `bytes` stay the token's own UTF-8 bytes),
    # so a client can tell apart tokens whose text is alike or is not whole UTF-8 on its own, and
    # send an alternative back as a prompt token (the playground's "force this token").
    return_tokens_as_token_ids: StrictBool = False


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    add_generation_prompt: StrictBool = True
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    # OpenAI's deprecated forms of tools: declared so that a request using them gets a 400 naming
    # the field, not an answer that ignored it.
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None


# A prompt is text, a batch of texts, token ids, or a batch of token-id lists.
PromptInput = str | list[str] | list[StrictInt] | list[list[StrictInt]]


class CompletionRequest(SamplingFields):
    prompt: PromptInput
    logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: StrictBool = False


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[Tool] | None = None  # shown to the chat template, as in a chat request
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: StrictBool = False  # vLLM's: also answer each token's vocabulary piece


class LoadLoRAAdapterRequest(_StrictRequest):
    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1)


class UnloadLoRAAdapterRequest(_StrictRequest):
    lora_name: str = Field(min_length=1, max_length=256)


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[StrictInt]
    return_token_strs: StrictBool = False  # as in /tokenize: each token's vocabulary piece too


# ---- responses ------------------------------------------------------------------------------


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class HealthStatus(BaseModel):
    status: Literal["ok", "loading", "failed", "draining", "unhealthy"]
    error: str | None = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] = Field(default_factory=list)


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # None when the answer is only tool calls
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


def _now() -> int:
    return int(time.time())


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatChunkChoice(BaseModel):
    index: int
    # {"role": "assistant", "content": ""} first, then {"content": "..."} or {"tool_calls": [...]}
    delta: dict[str, Any]
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "nanoinfer"
    max_model_len: int | None = None
    root: str | None = None  # where the weights came from (an adapter's directory)
    parent: str | None = None  # an adapter's base model


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")  # the schema says so: no field beyond these

    tokens: list[int]
    count: int
    max_model_len: int
    # With return_token_strs: each token's piece as the vocabulary spells it (vLLM's
    # convert_ids_to_tokens): byte-level BPE writes bytes as printable characters ("Ġ" is a
    # space), so a piece may be part of a UTF-8 character.
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str
    token_strs: list[str] | None = None  # with return_token_strs, as in TokenizeResponse
