"""Structured outputs: decoding masked to a JSON schema, regex, choice or grammar (llguidance).

The grammar engine is llguidance (docs/design.md, "Structured outputs", says why): it builds a
token mask from the grammar's lexer and an Earley parser at each step, so a new schema costs no
per-vocabulary precompilation, which keeps the first token of a request with a fresh schema fast.

`StructuredOutputs` belongs to an engine: the model's tokenizer as llguidance sees it (built at
first use, about a second) and a cache of grammars by request spec. `GrammarState` is one
sequence's matcher: the sampler masks that sequence's logits with it, and the engine advances it
with every token the sequence keeps. A preempted sequence keeps its state (its tokens do not
change, only its KV is recomputed); each of n > 1 choices has its own.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from nanoinfer.errors import RequestError
from nanoinfer.sampling_params import StructuredOutputsParams
from nanoinfer.tokenizer import Tokenizer

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

_CACHE_SIZE = 256  # compiled grammars kept, most recently used first
# Not lenient: a schema keyword llguidance cannot enforce is refused, never silently ignored.
# One-line JSON with single spaces after ',' and ':' (as OpenAI's JSON mode writes it): with free
# whitespace a small model can spend its whole budget on newlines inside an object.
_JSON_OPTIONS: JsonCompileOptions = {
    "lenient": False,
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


class GrammarState:
    """One sequence's matcher: the mask of allowed next tokens, and acceptance of a chosen one."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._matcher = matcher
        self._vocab_size = vocab_size
        self._num_accepted = 0
        self._mask: tuple[int, torch.Tensor] | None = None  # (tokens accepted when computed, mask)

    def allowed(self) -> torch.Tensor:
        """bool [vocab_size]: the tokens the grammar allows next (EOS only where it may end).
        Computed once per position, so `prefetch` on another thread can do it ahead of time."""
        if self._mask is not None and self._mask[0] == self._num_accepted:
            return self._mask[1]
        # Little-endian 32-bit words, bit j of word i for token 32 i + j: as bytes, unpackbits in
        # little bit order yields the tokens in order (one C call; torch shifts cost 10x more).
        bits = np.unpackbits(np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = np.zeros(self._vocab_size, dtype=np.bool_)  # the model's padded rows are never allowed
        n = min(len(bits), self._vocab_size)
        allowed[:n] = bits[:n]
        self._mask = (self._num_accepted, torch.from_numpy(allowed))
        return self._mask[1]

    def mask_(self, logits: torch.Tensor) -> torch.Tensor:
        """Set the logits [V] of disallowed tokens to -inf, in place; returns them."""
        return logits.masked_fill_(~self.allowed().to(logits.device), float("-inf"))

    def accept(self, token: int) -> None:
        """Advance past a kept token. The sampler only picks allowed ones, so a refusal is a bug."""
        if not self._matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self._matcher.get_error()}")
        self._num_accepted += 1

    @property
    def finished(self) -> bool:
        """True when the grammar allows nothing more (the output is complete)."""
        return bool(self._matcher.is_stopped())


class StructuredOutputs:
    """The engine's grammar compiler: the tokenizer as llguidance sees it, and cached grammars."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._ll_tokenizer: Any = None
        self._cache: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()  # validate_request runs on server worker threads too

    def _ll(self) -> Any:
        with self._lock:
            if self._ll_tokenizer is None:
                import llguidance

                tok = self._tokenizer
                self._ll_tokenizer = llguidance.LLTokenizer(
                    tok.backend.to_str(), n_vocab=tok.vocab_size, eos_token=list(tok.eos_token_ids) or None
                )
            return self._ll_tokenizer

    def grammar(self, spec: StructuredOutputsParams) -> str:
        """The llguidance grammar of a request's spec, validated; raises RequestError naming the problem."""
        key = _key(spec)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        grammar = _to_grammar(spec)
        import llguidance

        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self._ll())
        if is_error:
            raise RequestError(f"invalid {spec.kind} for structured outputs: {messages[0]}", "structured_outputs")
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return grammar

    def state(self, spec: StructuredOutputsParams) -> GrammarState:
        """A fresh matcher for one sequence."""
        import llguidance

        matcher = llguidance.LLMatcher(self._ll(), self.grammar(spec), log_level=0)
        if matcher.is_error():
            raise RequestError(f"structured outputs: {matcher.get_error()}", "structured_outputs")
        return GrammarState(matcher, self._vocab_size)


def _key(spec: StructuredOutputsParams) -> str:
    return json.dumps([spec.kind, spec.json, spec.regex, spec.choice, spec.grammar], sort_keys=True)


def _to_grammar(spec: StructuredOutputsParams) -> str:
    from llguidance import LLMatcher

    if spec.json_object:
        return LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=_JSON_OPTIONS)
    if spec.json is not None:
        schema = spec.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise RequestError(f"the JSON schema is not valid JSON: {e}", "structured_outputs") from None
        if not isinstance(schema, dict):
            raise RequestError("a JSON schema must be a JSON object", "structured_outputs")
        return LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)
    if spec.regex is not None:
        try:
            re.compile(spec.regex)
        except re.error as e:
            raise RequestError(f"invalid regex for structured outputs: {e}", "structured_outputs") from None
        return LLMatcher.grammar_from_regex(ascii_digits(spec.regex))
    if spec.choice is not None:
        return LLMatcher.grammar_from_regex("|".join(f"(?:{re.escape(c)})" for c in spec.choice))
    assert spec.grammar is not None
    return LLMatcher.grammar_from_lark(spec.grammar)


def ascii_digits(regex: str) -> str:
    """`\\d` as [0-9]: llguidance's regex `\\d` matches any Unicode digit ("٩", "𝟎"), but users of a
    regex constraint (and JSON schema's ECMA-262 `pattern`) mean ASCII digits. Inside a class
    `\\d` becomes `0-9`; `\\D` outside one becomes `[^0-9]`."""
    out: list[str] = []
    in_class, i = False, 0
    while i < len(regex):
        c = regex[i]
        if c == "\\" and i + 1 < len(regex):
            escaped = regex[i + 1]
            if escaped == "d":
                out.append("0-9" if in_class else "[0-9]")
            elif escaped == "D" and not in_class:
                out.append("[^0-9]")
            else:
                out.append(c + escaped)
            i += 2
            continue
        if c == "[" and not in_class:
            in_class = True
            out.append(c)
            i += 1
            if i < len(regex) and regex[i] == "^":
                out.append("^")
                i += 1
            if i < len(regex) and regex[i] == "]":  # a leading ] is a literal
                out.append("]")
                i += 1
            continue
        if c == "]" and in_class:
            in_class = False
        out.append(c)
        i += 1
    return "".join(out)
