"""SamplingParams: how one request wants its tokens chosen and when to stop."""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass
from typing import Any

from nanoinfer.config import RequestLimits
from nanoinfer.errors import RequestError

# Below this temperature, dividing logits would only amplify noise: treat it as argmax.
GREEDY_EPS = 1e-5
MAX_LOGPROBS = 20


def _fail(message: str, param: str | None = None) -> None:
    # RequestError subclasses ValueError, so callers may catch either.
    raise RequestError(message, param=param)


def _is_number(x: Any) -> bool:
    """A finite int or float: NaN and infinities would poison the logits."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class RequestOutputKind(enum.Enum):
    """What each RequestOutput of a request carries (vLLM's names)."""

    CUMULATIVE = "cumulative"  # everything so far, every step (the offline API's default)
    DELTA = "delta"  # only what is new since the previous output: streaming without copies
    FINAL_ONLY = "final_only"  # nothing until the request finishes, then everything


@dataclass
class StructuredOutputsParams:
    """Constrain the output to a language (vLLM's names): exactly one of a JSON schema, any JSON
    object, a regular expression, a choice of strings or a Lark grammar (llguidance's dialect)."""

    json: dict[str, Any] | str | None = None  # a JSON schema, as a dict or its text
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False  # any JSON object (OpenAI's response_format json_object)

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            which = ", ".join(given) if given else "none"
            _fail(
                f"structured outputs need exactly one of json, regex, choice, grammar, json_object (got {which})",
                "structured_outputs",
            )
        if self.choice is not None and (
            not isinstance(self.choice, list) or not self.choice or not all(isinstance(c, str) for c in self.choice)
        ):
            _fail("structured_outputs.choice must be a non-empty list of strings", "structured_outputs")

    @property
    def kind(self) -> str:
        return (
            "json_object"
            if self.json_object
            else next(n for n in ("json", "regex", "choice", "grammar") if getattr(self, n) is not None)
        )


@dataclass
class SamplingParams:
    """Per-request sampling parameters (OpenAI/vLLM names and semantics).

    After construction `stop` is a list, `stop_token_ids` a list and `logit_bias` a dict.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF semantics: over prompt and output tokens
    presence_penalty: float = 0.0  # OpenAI semantics: over output tokens only
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # n top alternatives besides the chosen token; 0 = chosen only
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # Decoding is masked to the language it names; logprobs are then those of the masked logits.
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.structured_outputs, dict):
            fields = {f.name for f in dataclasses.fields(StructuredOutputsParams)}
            unknown = sorted(set(self.structured_outputs) - fields)
            if unknown:
                _fail(f"unknown structured_outputs field(s): {', '.join(unknown)}", "structured_outputs")
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            _fail(f"n must be an integer >= 1, got {self.n!r}", "n")
        if not _is_number(self.temperature) or self.temperature < 0:
            _fail(f"temperature must be a finite number >= 0, got {self.temperature!r}", "temperature")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            _fail(f"top_p must be in (0, 1], got {self.top_p!r}", "top_p")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            _fail(f"top_k must be an integer >= -1 (0 or -1 disables it), got {self.top_k!r}", "top_k")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            _fail(f"min_p must be in [0, 1], got {self.min_p!r}", "min_p")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            _fail(
                f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}", "repetition_penalty"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                _fail(f"{name} must be in [-2, 2], got {value!r}", name)
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            _fail(f"seed must be an integer, got {self.seed!r}", "seed")
        if self.max_tokens is not None and (
            not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1
        ):
            _fail(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}", "max_tokens")
        if self.logprobs is not None and (
            not isinstance(self.logprobs, int)
            or isinstance(self.logprobs, bool)
            or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            _fail(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}", "logprobs")
        if not isinstance(self.output_kind, RequestOutputKind):
            _fail(f"output_kind must be a RequestOutputKind, got {self.output_kind!r}", "output_kind")
        self.stop = self._normalize_stop(self.stop)
        self.stop_token_ids = self._normalize_stop_token_ids(self.stop_token_ids)
        self.logit_bias = self._normalize_logit_bias(self.logit_bias)

    @staticmethod
    def _normalize_stop(stop: list[str] | str | None) -> list[str]:
        stops = [] if stop is None else [stop] if isinstance(stop, str) else list(stop)
        for s in stops:
            if not isinstance(s, str):
                _fail(f"stop strings must be strings, got {s!r}", "stop")
            if not s:
                _fail("stop strings must not be empty", "stop")
        return stops

    @staticmethod
    def _normalize_stop_token_ids(ids: list[int] | None) -> list[int]:
        ids = [] if ids is None else list(ids)
        for t in ids:
            if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                _fail(f"stop_token_ids must be non-negative integers, got {t!r}", "stop_token_ids")
        return ids

    @staticmethod
    def _normalize_logit_bias(bias: dict[int, float] | None) -> dict[int, float]:
        out: dict[int, float] = {}
        for token, value in (bias or {}).items():
            # JSON object keys arrive as strings; the HTTP layer must convert them first.
            if not isinstance(token, int) or isinstance(token, bool) or token < 0:
                _fail(f"logit_bias keys must be non-negative integer token ids, got {token!r}", "logit_bias")
            if not _is_number(value) or not -100 <= value <= 100:
                _fail(f"logit_bias values must be in [-100, 100], got {value!r} for token {token}", "logit_bias")
            out[token] = float(value)
        return out

    @property
    def greedy(self) -> bool:
        """True when the request asks for argmax decoding (temperature 0 or nearly)."""
        return self.temperature < GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        """True when any repetition, presence or frequency penalty is active."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def check_vocab(self, vocab_size: int) -> None:
        """Raise RequestError if logit_bias or stop_token_ids name tokens outside the vocabulary."""
        bias, stop_ids = self.logit_bias or {}, self.stop_token_ids or []  # both normalized by __post_init__
        for t in [*bias, *stop_ids]:
            if t >= vocab_size:
                _fail(
                    f"token id {t} is out of range for a vocabulary of {vocab_size}",
                    "logit_bias" if t in bias else "stop_token_ids",
                )

    def check_limits(self, limits: RequestLimits) -> None:
        """Raise RequestError if this request asks for more than `limits` allow."""
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []  # a list after __post_init__
        checks = [  # (field, what is counted, how many, the limit)
            ("n", "choices (n)", self.n, limits.max_n),
            ("stop", "stop strings", len(stops), limits.max_stop_strings),
            ("stop", "characters in one stop string", max(map(len, stops), default=0), limits.max_stop_string_chars),
            ("stop_token_ids", "stop_token_ids", len(self.stop_token_ids or ()), limits.max_stop_token_ids),
            ("logit_bias", "logit_bias entries", len(self.logit_bias or {}), limits.max_logit_bias),
            ("logprobs", "top logprobs", self.logprobs or 0, limits.max_top_logprobs),
        ]
        for name, what, value, bound in checks:
            if value > bound:
                _fail(f"too many {what}: {value} exceeds this server's limit of {bound}", name)

    @classmethod
    def from_request(cls, defaults: Any = None, **kwargs: Any) -> SamplingParams:
        """Build from request fields: given values win, then `defaults` attributes, then dataclass defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            _fail(f"unknown sampling parameter(s): {', '.join(unknown)}")
        chosen: dict[str, Any] = {}
        for name in names:
            value = kwargs.get(name)
            if value is None:
                value = getattr(defaults, name, None)
            if value is not None:  # still None: leave it to the dataclass default
                chosen[name] = value
        return cls(**chosen)
