"""Tool-call parsers: a model's output text, as it streams, split into content and tool calls.

Each model family writes calls in its own format; a parser reads that format incrementally and
reports events: content text, the start of a call (its name), and fragments of the call's
arguments as they arrive. Streaming and whole answers use the same parser, so both give the
same calls. Arguments are the model's own JSON text, not re-serialized.

- hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, repeated (Hermes, Qwen).
- llama3_json: the answer is `{"name": ..., "parameters": {...}}`, several joined by `;`,
  optionally after `<|python_tag|>` (Llama 3.1+).
- mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`, or `[TOOL_CALLS]name[ARGS]{...}`
  per call in newer tokenizers.
- json_array (tool_choice "required", decoding constrained): `[{"name": ..., "parameters": {...}}, ...]`.
- named (tool_choice names a function, decoding constrained to its parameters): the arguments alone.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass

# ---- events ---------------------------------------------------------------------------------


@dataclass
class ContentDelta:
    text: str


@dataclass
class CallStart:
    index: int  # calls are numbered from 0 within one answer
    name: str


@dataclass
class ArgumentsDelta:
    index: int
    text: str


Event = ContentDelta | CallStart | ArgumentsDelta

ARGUMENT_KEYS = ("arguments", "parameters")  # which name a format uses varies by family
MAX_NAME_CHARS = 64  # OpenAI's limit on a function name


# ---- one JSON object, character by character ------------------------------------------------


class ObjectReader:
    """Reads one JSON object a character at a time and tells which top-level member each character
    belongs to. It tracks strings and nesting only; whether the object is valid JSON is checked
    once it is complete (`valid`)."""

    def __init__(self) -> None:
        self.raw: list[str] = []
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.in_key = False
        self.key_chars: list[str] = []
        self.expect_key = True
        self.key: str | None = None  # the member whose value is being read
        self.value: list[str] = []
        self.members: dict[str, str] = {}  # complete members: key -> raw value text
        self.done = False

    def feed(self, ch: str) -> str:
        """Consume one character; returns it when it is part of the current member's value, else ''."""
        self.raw.append(ch)
        if self.depth == 0:  # the caller starts us at '{'
            self.depth = 1
            return ""
        if self.in_key:
            self._key_char(ch)
            return ""
        if self.depth > 1 or self.in_string:
            self._nested_char(ch)
            return self._value(ch)
        return self._top_char(ch)

    def _string_ends(self, ch: str) -> bool:
        """Follow escapes inside a string; True at its closing quote."""
        if self.escaped:
            self.escaped = False
            return False
        if ch == "\\":
            self.escaped = True
            return False
        return ch == '"'

    def _key_char(self, ch: str) -> None:
        if self._string_ends(ch):
            self.in_key = False
            try:
                self.key = json.loads('"' + "".join(self.key_chars) + '"')
            except ValueError:
                self.key = "".join(self.key_chars)
            self.key_chars = []
            return
        self.key_chars.append(ch)

    def _nested_char(self, ch: str) -> None:
        if self.in_string:
            self.in_string = not self._string_ends(ch)
        elif ch == '"':
            self.in_string = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1

    def _top_char(self, ch: str) -> str:
        """A character directly inside the object, outside any string."""
        if ch.isspace():
            return ""  # whitespace between members is never part of a value
        if ch == '"' and self.expect_key:
            self.in_key, self.expect_key = True, False
            return ""
        if ch == ":":
            return ""
        if ch in ",}":
            if self.key is not None:
                self.members[self.key] = "".join(self.value)
            self.key, self.value, self.expect_key = None, [], True
            self.done = ch == "}"
            return ""
        if ch == '"':
            self.in_string = True
        elif ch in "{[":
            self.depth += 1
        return self._value(ch)

    def _value(self, ch: str) -> str:
        self.value.append(ch)
        return ch

    @property
    def text(self) -> str:
        return "".join(self.raw)

    def valid(self) -> bool:
        try:
            return isinstance(json.loads(self.text), dict)
        except ValueError:
            return False


class _CallReader:
    """One call object `{"name": ..., <argument key>: {...}}` read as it streams.

    The call starts once its name is complete; argument characters stream after that. When the
    arguments come before the name, or are a JSON string holding the object, they are held back
    and sent whole once the object is complete.
    """

    def __init__(self, index: int) -> None:
        self.index = index
        self.reader = ObjectReader()
        self.started = False
        self.held: list[str] = []  # argument characters not sent yet
        self.sent_arguments = False
        self.string_arguments = False  # the arguments are a JSON string holding the object

    def feed(self, ch: str) -> list[Event]:
        reader = self.reader
        piece = reader.feed(ch)
        events: list[Event] = []
        if not self.started and isinstance(reader.members.get("name"), str):
            name = _json_string(reader.members["name"])
            if name is not None:
                self.started = True
                events.append(CallStart(self.index, name))
        if piece and reader.key in ARGUMENT_KEYS:
            if not self.held and not self.sent_arguments:
                self.string_arguments = piece == '"'
            if self.started and not self.string_arguments:
                self.sent_arguments = True
                events.append(ArgumentsDelta(self.index, "".join(self.held) + piece))
                self.held = []
            else:
                self.held.append(piece)
        if reader.done:
            events.extend(self._finish())
        return events

    def _finish(self) -> list[Event]:
        """The object is complete: send what was held back."""
        members = self.reader.members
        events: list[Event] = []
        if not self.started:
            name = _json_string(members.get("name", ""))
            if name is None:
                return []
            self.started = True
            events.append(CallStart(self.index, name))
        if self.held:
            text = "".join(self.held)
            if self.string_arguments:
                text = _json_string(text) or ""
            events.append(ArgumentsDelta(self.index, text))
            self.held = []
        elif not self.sent_arguments and not any(k in members for k in ARGUMENT_KEYS):
            events.append(ArgumentsDelta(self.index, "{}"))
        return events

    @property
    def is_call(self) -> bool:
        """A complete object that is a call: valid JSON with a string name."""
        return self.reader.valid() and _json_string(self.reader.members.get("name", "")) is not None


def _json_string(raw: str) -> str | None:
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, str) else None


# ---- parsers --------------------------------------------------------------------------------


class ToolCallParser(ABC):
    """Splits one answer into content and calls; feed it text as it arrives, then close it."""

    # Markers that are special tokens in the model's vocabulary vanish when special tokens are
    # skipped in decoding, so the server keeps them for parsers that need them.
    needs_special_tokens = False

    def __init__(self) -> None:
        self.calls = 0

    def feed(self, text: str) -> list[Event]:
        """Events for the next piece of output text."""
        return _merged(self._feed(text))

    def close(self) -> list[Event]:
        """Events for whatever was held back at the end of the output."""
        return _merged(self._close())

    @abstractmethod
    def _feed(self, text: str) -> list[Event]: ...

    def _close(self) -> list[Event]:
        return []


def _merged(events: list[Event]) -> list[Event]:
    """Neighbouring pieces of the same kind (and call) joined: one event per kind per step."""
    out: list[Event] = []
    for event in events:
        last = out[-1] if out else None
        if isinstance(event, ContentDelta) and isinstance(last, ContentDelta):
            out[-1] = ContentDelta(last.text + event.text)
        elif isinstance(event, ArgumentsDelta) and isinstance(last, ArgumentsDelta) and last.index == event.index:
            out[-1] = ArgumentsDelta(event.index, last.text + event.text)
        else:
            out.append(event)
    return out


def _hold_partial(text: str, marker: str) -> int:
    """Length of the longest end of `text` that could be the start of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class _MarkedCalls(ToolCallParser):
    """Content until a marker; after it, calls in the format the subclass reads."""

    marker = ""

    def __init__(self) -> None:
        super().__init__()
        self.buffer = ""  # text not yet classified
        self.in_calls = False

    def _feed(self, text: str) -> list[Event]:
        self.buffer += text
        events: list[Event] = []
        while self.buffer:
            if self.in_calls:
                more = self._calls(events)
                if not more:
                    break
                continue
            at = self.buffer.find(self.marker)
            if at < 0:
                keep = _hold_partial(self.buffer, self.marker)
                _content(events, self.buffer[: len(self.buffer) - keep])
                self.buffer = self.buffer[len(self.buffer) - keep :]
                break
            _content(events, self.buffer[:at])
            self.buffer = self.buffer[at + len(self.marker) :]
            self.in_calls = True
            self._start_calls()
        return events

    def _start_calls(self) -> None:
        """A marker was just read."""

    @abstractmethod
    def _calls(self, events: list[Event]) -> bool:
        """Consume call text from the buffer; False when it needs more text to go on."""

    def _close(self) -> list[Event]:
        events: list[Event] = []
        if not self.in_calls:
            _content(events, self.buffer)
        self.buffer = ""
        return events


def _content(events: list[Event], text: str) -> None:
    if text:
        events.append(ContentDelta(text))


class _CallSequence:
    """Call objects one after another, with separators between them, read as they stream.

    `feed` takes the buffer and returns what it did not consume; it reports finished (`done`)
    when the text stops looking like another call.
    """

    def __init__(self, parser: ToolCallParser, separator: str, closer: str | None) -> None:
        self.parser = parser
        self.separator = separator
        self.closer = closer  # the character that ends the sequence (']' for arrays)
        self.call: _CallReader | None = None
        self.done = False
        self.failed_text = ""  # an object that turned out not to be a call, given back as content

    def feed(self, buffer: str, events: list[Event]) -> str:
        i = 0
        while i < len(buffer) and not self.done:
            ch = buffer[i]
            if self.call is not None:
                events.extend(self.call.feed(ch))
                i += 1
                if self.call.reader.done:
                    self._end_call()
                continue
            if ch.isspace() or ch == self.separator:
                i += 1
            elif ch == "{":
                self.call = _CallReader(self.parser.calls)
            else:
                if ch == self.closer:
                    i += 1
                self.done = True
        return buffer[i:]

    def _end_call(self) -> None:
        assert self.call is not None
        if self.call.started:
            self.parser.calls += 1
        if not self.call.is_call and not self.call.started:
            self.failed_text = self.call.reader.text
            self.done = True
        self.call = None


class HermesParser(_MarkedCalls):
    """`<tool_call>{json}</tool_call>` blocks among ordinary text."""

    marker = "<tool_call>"
    end = "</tool_call>"

    def __init__(self) -> None:
        super().__init__()
        self.call: _CallReader | None = None

    def _calls(self, events: list[Event]) -> bool:
        if self.call is None:
            stripped = self.buffer.lstrip()
            if not stripped:
                return False
            if not stripped.startswith("{"):  # not a call after all: the marker was text
                self.in_calls = False
                _content(events, self.marker)
                return True
            self.buffer = stripped
            self.call = _CallReader(self.calls)
        if not self.call.reader.done:
            i = 0
            while i < len(self.buffer) and not self.call.reader.done:
                events.extend(self.call.feed(self.buffer[i]))
                i += 1
            self.buffer = self.buffer[i:]
            if not self.call.reader.done:
                return False
            if self.call.started:
                self.calls += 1
            else:
                _content(events, self.marker + self.call.reader.text)
        rest = self.buffer.lstrip()
        if len(rest) < len(self.end) and self.end.startswith(rest):
            return False  # the end marker may still come
        if rest.startswith(self.end):
            self.buffer = rest[len(self.end) :]
        self.call = None
        self.in_calls = False
        return True

    def _close(self) -> list[Event]:
        events: list[Event] = []
        if not self.in_calls:
            _content(events, self.buffer)
        elif self.call is None:
            _content(events, self.marker + self.buffer)  # a marker with nothing after it
        elif not self.call.started:
            _content(events, self.marker + self.call.reader.text)  # cut off before its name
        self.buffer = ""
        return events


class Llama3JsonParser(ToolCallParser):
    """Llama 3.1+: an answer that is a JSON call (or several, joined by `;`) is a tool call."""

    needs_special_tokens = True
    python_tag = "<|python_tag|>"

    def __init__(self) -> None:
        super().__init__()
        self.buffer = ""
        self.mode = "undecided"  # undecided | calls | text
        self.sequence = _CallSequence(self, ";", None)

    def _feed(self, text: str) -> list[Event]:
        self.buffer += text
        events: list[Event] = []
        if self.mode == "undecided":
            head = self.buffer.lstrip()
            if head.startswith(self.python_tag):
                head = head[len(self.python_tag) :].lstrip()
            if not head or (self.python_tag.startswith(head) and len(head) < len(self.python_tag)):
                return events
            if head.startswith("{"):
                self.mode, self.buffer = "calls", head
            else:
                self.mode = "text"
        if self.mode == "calls":
            self.buffer = self.sequence.feed(self.buffer, events)
            if self.sequence.done:
                self.mode = "text"
                self.buffer = self.sequence.failed_text + self.buffer
        if self.mode == "text":
            _content(events, self.buffer)
            self.buffer = ""
        return events

    def _close(self) -> list[Event]:
        events: list[Event] = []
        if self.mode != "calls":
            _content(events, self.buffer)
        return events


class MistralParser(_MarkedCalls):
    """`[TOOL_CALLS]` then a JSON array of calls, or (newer tokenizers) `name[ARGS]{...}` per call."""

    needs_special_tokens = True
    marker = "[TOOL_CALLS]"
    args_marker = "[ARGS]"

    def __init__(self) -> None:
        super().__init__()
        self.sequence: _CallSequence | None = None
        self.arguments: ObjectReader | None = None

    def _start_calls(self) -> None:
        self.sequence = None
        self.arguments = None

    def _calls(self, events: list[Event]) -> bool:
        if self.sequence is None and self.arguments is None:
            stripped = self.buffer.lstrip()
            if not stripped:
                return False
            if stripped.startswith("["):
                self.sequence = _CallSequence(self, ",", "]")
                self.buffer = stripped[1:]
            else:
                return self._named_call(events)
        if self.sequence is not None:
            self.buffer = self.sequence.feed(self.buffer, events)
            if not self.sequence.done:
                return False
            _content(events, self.sequence.failed_text)
            self.in_calls = False
            return True
        return self._arguments(events)

    def _named_call(self, events: list[Event]) -> bool:
        at = self.buffer.find(self.args_marker)
        if at < 0:
            if len(self.buffer) <= MAX_NAME_CHARS + len(self.args_marker):
                return False
            self.in_calls = False  # no call follows: the marker was text
            _content(events, self.marker)
            return True
        name = self.buffer[:at].strip()
        self.buffer = self.buffer[at + len(self.args_marker) :].lstrip()
        events.append(CallStart(self.calls, name))
        self.arguments = ObjectReader()
        return True

    def _arguments(self, events: list[Event]) -> bool:
        reader = self.arguments
        assert reader is not None
        i = 0
        while i < len(self.buffer) and not reader.done:
            reader.feed(self.buffer[i])
            i += 1
        if i:
            events.append(ArgumentsDelta(self.calls, self.buffer[:i]))
        self.buffer = self.buffer[i:]
        if not reader.done:
            return False
        self.calls += 1
        self.arguments = None
        self.in_calls = False
        return True

    def _close(self) -> list[Event]:
        events: list[Event] = []
        if self.in_calls and self.sequence is None and self.arguments is None:
            _content(events, self.marker + self.buffer)
        elif self.sequence is not None and self.sequence.call is not None and not self.sequence.call.started:
            _content(events, self.sequence.call.reader.text)  # cut off before its name
        return events + super()._close()


class JsonArrayParser(ToolCallParser):
    """tool_choice "required": decoding is held to `[{"name": ..., "parameters": {...}}, ...]`."""

    def __init__(self) -> None:
        super().__init__()
        self.buffer = ""
        self.opened = False
        self.sequence = _CallSequence(self, ",", "]")

    def _feed(self, text: str) -> list[Event]:
        self.buffer += text
        events: list[Event] = []
        if not self.opened:
            self.buffer = self.buffer.lstrip()
            if not self.buffer:
                return events
            self.opened = True
            if self.buffer.startswith("["):
                self.buffer = self.buffer[1:]
        self.buffer = self.sequence.feed(self.buffer, events)
        return events


class NamedCallParser(ToolCallParser):
    """tool_choice names a function: the whole output is that call's arguments."""

    def __init__(self, function: str) -> None:
        super().__init__()
        self.function = function

    def _feed(self, text: str) -> list[Event]:
        events: list[Event] = []
        if self.calls == 0:
            self.calls = 1
            events.append(CallStart(0, self.function))
        if text:
            events.append(ArgumentsDelta(0, text))
        return events

    def _close(self) -> list[Event]:
        return self._feed("") if self.calls == 0 else []


# Formats a model chooses itself, by the name `--tool-call-parser` takes.
TOOL_CALL_PARSERS: dict[str, type[ToolCallParser]] = {
    "hermes": HermesParser,
    "llama3_json": Llama3JsonParser,
    "mistral": MistralParser,
}


def detect_tool_call_parser(chat_template: str) -> str | None:
    """The call format a chat template teaches its model, from the markers it writes."""
    if "[TOOL_CALLS]" in chat_template or "[AVAILABLE_TOOLS]" in chat_template:
        return "mistral"
    if "<tool_call>" in chat_template:
        return "hermes"
    if "<|python_tag|>" in chat_template or '"parameters": dictionary of argument name' in chat_template:
        return "llama3_json"
    return None
