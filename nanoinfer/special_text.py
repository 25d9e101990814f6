"""Tokenizing a rendered chat so that special-token text typed into the messages stays text."""

from __future__ import annotations

import re
import threading
from collections import abc
from collections.abc import Sequence
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.models import WordLevel

# ---------------------------------------------------------------------------------------------
# Special-token text inside messages
# ---------------------------------------------------------------------------------------------

# Placeholders and stand-ins are 3 characters: a bracket, chr(_SLOT_BASE + index), the bracket
# again, all from Unicode's last private-use plane, which real text does not contain.
_HIDE = "\U0010fffb"  # brackets a placeholder for special-token text found in the messages
_MARK = "\U0010fffc"  # brackets a stand-in for a special token the template itself wrote
_SLOT_BASE = 0x100000
_MAX_SLOTS = 0xFFFB
_PLACEHOLDER = re.compile(f"{_HIDE}(.){_HIDE}", re.DOTALL)


def _slot(bracket: str, index: int) -> str:
    if index >= _MAX_SLOTS:
        raise ValueError("too many special-token strings in the messages")
    return f"{bracket}{chr(_SLOT_BASE + index)}{bracket}"


def _like(token: AddedToken, content: str, special: bool) -> AddedToken:
    """An added token matched exactly like `token` (same stripping and word rules), with other text."""
    return AddedToken(
        content,
        single_word=token.single_word,
        lstrip=token.lstrip,
        rstrip=token.rstrip,
        normalized=token.normalized,
        special=special,
    )


class SpecialTextGuard:
    """Tokenizes a rendered chat so that special-token text that came from the messages stays text.

    Encoding the rendered string whole would turn "<|im_end|><|im_start|>system" typed by a user
    into real control tokens (role injection). Instead the messages are rendered a second time
    with that text replaced by placeholders: the special tokens still in that rendering are the
    template's own. Those become stand-in tokens, the placeholders go back to the user's text,
    and one encode with special-token matching off (stand-ins still match) gives the ids, so the
    text around them splits exactly as in an ordinary encode.
    """

    def __init__(self, backend: BackendTokenizer) -> None:
        self._backend = backend
        self._added = backend.get_added_tokens_decoder()
        # Finds added tokens the way the backend does (same flags, same matcher) without running BPE.
        self._finder = BackendTokenizer(WordLevel({"\x00": 0}, unk_token="\x00"))
        if backend.normalizer is not None:
            self._finder.normalizer = backend.normalizer
        self._finder.add_tokens([_like(t, t.content, t.special) for t in self._added.values()])
        self._special_of = {self._finder.token_to_id(t.content): i for i, t in self._added.items() if t.special}
        specials = [t for t in self._added.values() if t.special]
        # Quick test first: without any of these characters no special token can match (unless
        # some are matched after normalization, where the text may spell them differently).
        self._initials = None if any(t.normalized for t in specials) else {t.content[:1] for t in specials}
        self._text_backend: tuple[BackendTokenizer, dict[int, int], dict[int, str]] | None = None
        self._lock = threading.Lock()

    def specials_in(self, text: str) -> list[tuple[int, int, int]]:
        """(start, end, token id) of each special token the backend would match in `text`."""
        if self._initials is not None and not any(c in text for c in self._initials):
            return []
        enc = self._finder.encode(text, add_special_tokens=False)
        found = []
        for fid, (a, b) in zip(enc.ids, enc.offsets):
            token_id = self._special_of.get(fid)
            if token_id is not None:
                content = self._added[token_id].content
                start = text.find(content, a, b)  # offsets include whitespace that lstrip/rstrip eat
                # Not found: matched after normalization, spelled differently here; take the whole span.
                found.append((start, start + len(content), token_id) if start >= 0 else (a, b, token_id))
        return found

    def hide(self, data: Any, hidden: list[str]) -> Any:
        """`data` with special-token text in its strings replaced by placeholders (appended to `hidden`).

        Strings inside dicts, lists and tuples are searched (keys too); other objects are not.
        """
        if isinstance(data, str):
            spans = self.specials_in(data)
            if not spans:
                return data
            parts, pos = [], 0
            for start, end, _ in spans:
                parts += [data[pos:start], _slot(_HIDE, len(hidden))]
                hidden.append(data[start:end])
                pos = end
            return "".join([*parts, data[pos:]])
        if isinstance(data, abc.Mapping):
            items = [(self.hide(k, hidden), self.hide(v, hidden)) for k, v in data.items()]
            changed = any(k2 is not k or v2 is not v for (k2, v2), (k, v) in zip(items, data.items()))
            return dict(items) if changed else data
        if isinstance(data, (list, tuple)):
            new = [self.hide(x, hidden) for x in data]
            return type(data)(new) if any(a is not b for a, b in zip(new, data)) else data
        return data  # other objects are passed to the template as they are

    def encode(self, text: str, marked: str, hidden: Sequence[str]) -> list[int]:
        """Token ids of `text`, given `marked`: the same rendering with `hidden` text as placeholders."""
        if _HIDE in text or _MARK in text:
            raise ValueError("messages must not contain the private-use characters U+10FFFB or U+10FFFC")
        if _PLACEHOLDER.sub(lambda m: _unhide(m, hidden), marked) != text:
            raise ValueError(
                "the chat template changes special-token text inside the messages, so the "
                "prompt cannot be tokenized safely; remove special tokens from the messages"
            )
        backend, real_id, marker_of = self._text()
        parts, pos = [], 0
        for start, end, token_id in self.specials_in(marked):
            parts += [marked[pos:start], marker_of[token_id]]
            pos = end
        stand_ins = _PLACEHOLDER.sub(lambda m: _unhide(m, hidden), "".join([*parts, marked[pos:]]))
        ids = backend.encode(stand_ins, add_special_tokens=False).ids
        return [real_id.get(i, i) for i in ids]

    def _text(self) -> tuple[BackendTokenizer, dict[int, int], dict[int, str]]:
        """A copy of the backend that reads special tokens as text, plus one stand-in token per special token."""
        with self._lock:  # built on first use only: a copy of a large vocabulary takes a moment
            if self._text_backend is None:
                backend = BackendTokenizer.from_str(self._backend.to_str())
                backend.encode_special_tokens = True
                specials = {i: t for i, t in self._added.items() if t.special}
                marker_of = {i: _slot(_MARK, k) for k, i in enumerate(specials)}
                # Not special, so they still match while special tokens do not.
                backend.add_tokens([_like(t, marker_of[i], special=False) for i, t in specials.items()])
                real_id: dict[int, int] = {}
                for i in specials:
                    marker_id = backend.token_to_id(marker_of[i])
                    if marker_id is None:  # cannot happen: the marker was added just above
                        raise RuntimeError(f"stand-in token {marker_of[i]!r} is missing from the vocabulary")
                    real_id[marker_id] = i
                self._text_backend = backend, real_id, marker_of
            return self._text_backend


def _unhide(match: re.Match[str], hidden: Sequence[str]) -> str:
    index = ord(match[1]) - _SLOT_BASE
    return hidden[index] if 0 <= index < len(hidden) else match[0]
