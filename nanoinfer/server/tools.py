"""OpenAI tool calling: a request's tools checked and turned into template variables, an output
constraint and a parser; the answer split into content and `tool_calls`, whole or as stream deltas.

tool_choice decides how calls are made:
- "auto": the model writes calls in its own format (see tool_parsers), parsed from the output;
- "required": decoding is held to a JSON array of calls of the given functions (at least one);
- a named function: decoding is held to that function's parameters schema;
- "none": the tools are shown to the template, the answer is plain content.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nanoinfer.errors import RequestError
from nanoinfer.sampling_params import StructuredOutputsParams
from nanoinfer.server.errors import APIError
from nanoinfer.server.protocol import ChatCompletionRequest, FunctionCall, ToolCall
from nanoinfer.server.tool_parsers import (
    TOOL_CALL_PARSERS,
    ArgumentsDelta,
    CallStart,
    ContentDelta,
    Event,
    JsonArrayParser,
    NamedCallParser,
    ToolCallParser,
    detect_tool_call_parser,
)
from nanoinfer.tokenizer import Tokenizer

_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
_ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass
class ToolUse:
    """What a chat request asked of its tools, checked at admission."""

    tools: list[dict[str, Any]]  # OpenAI tool objects, as chat templates take them
    choice: str  # "none" | "auto" | "required" | "function" (then `function` names it)
    function: str | None = None
    parallel: bool = True
    parser: str | None = None  # the model's own call format, for "auto"

    @property
    def makes_calls(self) -> bool:
        return self.choice != "none"

    @property
    def keeps_special_tokens(self) -> bool:
        """Whether decoding must keep special tokens: the format's markers may be special tokens."""
        return self.choice == "auto" and self.parser is not None and TOOL_CALL_PARSERS[self.parser].needs_special_tokens

    def parameters(self, name: str) -> dict[str, Any]:
        """The schema a call of `name` is held to; closed objects when the function is strict."""
        for tool in self.tools:
            function = tool["function"]
            if function["name"] == name:
                schema = function.get("parameters") or _ANY_OBJECT
                return _closed(schema) if function.get("strict") else schema
        raise KeyError(name)

    def constraint(self) -> StructuredOutputsParams | None:
        """The output constraint of "required" and named choices (None for "auto" and "none")."""
        if self.choice == "function":
            assert self.function is not None
            return StructuredOutputsParams(json=self.parameters(self.function))
        if self.choice != "required":
            return None
        calls = [
            {
                "type": "object",
                "properties": {
                    "name": {"const": t["function"]["name"]},
                    "parameters": self.parameters(t["function"]["name"]),
                },
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for t in self.tools
        ]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if not self.parallel:
            schema["maxItems"] = 1
        return StructuredOutputsParams(json=schema)

    def new_parser(self) -> ToolCallParser | None:
        if self.choice == "function":
            assert self.function is not None
            return NamedCallParser(self.function)
        if self.choice == "required":
            return JsonArrayParser()
        if self.choice == "auto":
            assert self.parser is not None
            return TOOL_CALL_PARSERS[self.parser]()
        return None


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SUBSCHEMAS = ("items", "prefixItems", "anyOf", "oneOf", "allOf", "not", "if", "then", "else", "contains")


def _closed(node: Any) -> Any:
    """OpenAI's strict mode: an object takes only the properties it lists, unless it says otherwise."""
    if isinstance(node, list):
        return [_closed(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = dict(node)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: _closed(v) for k, v in out[key].items()}
    for key in _SUBSCHEMAS:
        if key in out:
            out[key] = _closed(out[key])
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _tool_list(body: ChatCompletionRequest) -> list[dict[str, Any]]:
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
    names = [t["function"]["name"] for t in tools]
    for i, name in enumerate(names):
        if not _FUNCTION_NAME.match(name):
            raise APIError(
                400, f"tools[{i}].function.name {name!r} must be 1-64 letters, digits, _ or -", param="tools"
            )
        if name in names[:i]:
            raise APIError(400, f"tools[{i}]: the function {name!r} is defined twice", param="tools")
    return tools


def tool_use(body: ChatCompletionRequest, tokenizer: Tokenizer, parser: str | None) -> ToolUse | None:
    """The request's tool settings, checked; None when it uses no tools. Raises APIError (400)."""
    for name in ("functions", "function_call"):
        if getattr(body, name) is not None:
            raise APIError(400, f"{name} is deprecated and not supported: send tools and tool_choice", param=name)
    tools = _tool_list(body)
    choice = body.tool_choice
    if not tools:
        if choice not in (None, "none"):
            raise APIError(400, "tool_choice is only allowed when tools are given", param="tool_choice")
        if body.parallel_tool_calls is not None:
            raise APIError(400, "parallel_tool_calls is only allowed when tools are given", param="parallel_tool_calls")
        return None
    use = ToolUse(tools, "auto", parallel=body.parallel_tool_calls is not False)
    if isinstance(choice, str):
        use.choice = choice
    elif choice is not None:
        use.choice, use.function = "function", choice.function.name
        if use.function not in {t["function"]["name"] for t in tools}:
            raise APIError(
                400, f"tool_choice names the function {use.function!r}, which is not in tools", param="tool_choice"
            )
    if use.makes_calls and not tokenizer.chat_template_uses("tools"):
        raise APIError(
            400,
            "this model's chat template does not support tools; start the server with a --chat-template "
            'that does, or send tool_choice "none"',
            param="tools",
        )
    if use.choice == "auto":
        use.parser = parser or detect_tool_call_parser(tokenizer.chat_template or "")
        if use.parser is None:
            raise APIError(
                400,
                "cannot tell which tool-call format this model writes; start the server with --tool-call-parser "
                f'({", ".join(TOOL_CALL_PARSERS)}), or send tool_choice "required" or a named function',
                param="tool_choice",
            )
    if use.makes_calls and (body.response_format is not None and body.response_format.type != "text"):
        raise APIError(
            400, 'response_format cannot be combined with tool calls; send tool_choice "none"', param="response_format"
        )
    if use.makes_calls and body.structured_outputs is not None:
        raise APIError(400, "structured_outputs cannot be combined with tool calls", param="structured_outputs")
    return use


def check_parameters(use: ToolUse, compile_schema: Callable[[StructuredOutputsParams], object]) -> None:
    """Every function's parameters must be a schema the grammar engine can enforce; a 400 names
    the first that is not. `compile_schema` compiles (and caches) one, raising RequestError."""
    for i, tool in enumerate(use.tools):
        name = tool["function"]["name"]
        try:
            compile_schema(StructuredOutputsParams(json=use.parameters(name)))
        except RequestError as e:
            raise APIError(400, f"tools[{i}] ({name}): the parameters schema: {e}", param="tools") from None


# ---- answers --------------------------------------------------------------------------------


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCallStream:
    """One choice's output turned into OpenAI message deltas: content, then tool-call pieces.

    Whitespace at the end of content is held back until more content follows, so the blank line a
    model writes before a call does not become an answer of its own.
    """

    parser: ToolCallParser
    max_calls: int | None  # 1 when parallel_tool_calls is false
    ids: list[str] = field(default_factory=list)
    held: str = ""

    @property
    def num_calls(self) -> int:
        return len(self.ids)

    def feed(self, text: str) -> list[dict[str, Any]]:
        return self._deltas(self.parser.feed(text) if text else [])

    def close(self) -> list[dict[str, Any]]:
        deltas = self._deltas(self.parser.close())
        if self.held and not self.ids:
            deltas.append({"content": self.held})
        self.held = ""
        return deltas

    def _deltas(self, events: list[Event]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for event in events:
            if isinstance(event, ContentDelta):
                text = self.held + event.text
                body = text.rstrip()
                self.held = text[len(body) :]
                if body:
                    out.append({"content": body})
                continue
            if self.max_calls is not None and event.index >= self.max_calls:
                continue  # parallel_tool_calls false: the first call only
            if isinstance(event, CallStart):
                self.ids.append(new_call_id())
                function = {"name": event.name, "arguments": ""}
                out.append(
                    {
                        "tool_calls": [
                            {"index": event.index, "id": self.ids[-1], "type": "function", "function": function}
                        ]
                    }
                )
            elif isinstance(event, ArgumentsDelta) and event.text:
                last = out[-1]["tool_calls"][0] if out and "tool_calls" in out[-1] else None
                if last is not None and last["index"] == event.index and "id" not in last:
                    last["function"]["arguments"] += event.text  # merge pieces of one step
                else:
                    out.append({"tool_calls": [{"index": event.index, "function": {"arguments": event.text}}]})
        return out


def tool_call_stream(use: ToolUse | None) -> ToolCallStream | None:
    """A fresh stream for one choice, or None when its output is plain content."""
    parser = use.new_parser() if use is not None else None
    if parser is None:
        return None
    assert use is not None  # a parser comes only from a ToolUse
    return ToolCallStream(parser, None if use.parallel else 1)


def parse_answer(stream: ToolCallStream, text: str) -> tuple[str | None, list[ToolCall]]:
    """A whole answer as message content and tool calls (content None when only calls were made)."""
    content: list[str] = []
    calls: list[ToolCall] = []
    for delta in stream.feed(text) + stream.close():
        if "content" in delta:
            content.append(delta["content"])
            continue
        piece = delta["tool_calls"][0]
        if "id" in piece:
            calls.append(ToolCall(id=piece["id"], function=FunctionCall(name=piece["function"]["name"], arguments="")))
        calls[-1].function.arguments += piece["function"]["arguments"]
    return ("".join(content) if content or not calls else None), calls


def finish_reason(reason: str | None, stream: ToolCallStream | None) -> str | None:
    """ "tool_calls" when the answer ended by making calls."""
    if stream is not None and stream.num_calls and reason == "stop":
        return "tool_calls"
    return reason


def template_messages(messages: list[dict[str, Any]]) -> None:
    """Assistant tool calls as chat templates expect them: arguments as objects, not JSON text."""
    for i, message in enumerate(messages):
        for j, call in enumerate(message.get("tool_calls") or []):
            try:
                call["function"]["arguments"] = json.loads(call["function"]["arguments"] or "{}")
            except (ValueError, RecursionError):  # a hostile nesting depth too
                raise APIError(
                    400, f"messages[{i}].tool_calls[{j}].function.arguments is not valid JSON", param="messages"
                ) from None
