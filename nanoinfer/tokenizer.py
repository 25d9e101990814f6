"""Tokenizer and streaming detokenization.

The tokenizer wraps a `tokenizers.Tokenizer`; it can come from a HF directory (tokenizer.json) or be
built from GGUF metadata (`nanoinfer.loading.gguf_tokenizer`). Chats are rendered by
`nanoinfer.chat_template`; when one is tokenized, special-token text typed into the messages stays
ordinary text (`nanoinfer.special_text`): only the template itself writes control tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, overload

from tokenizers import Tokenizer as BackendTokenizer

from nanoinfer.chat_template import ChatTemplate, render_limits
from nanoinfer.errors import ModelLoadError
from nanoinfer.special_text import SpecialTextGuard

REPLACEMENT_CHAR = "\ufffd"


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


class Tokenizer:
    """Text <-> token ids, plus special tokens and the chat template of one model."""

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_ids: Iterable[int] = (),
        pad_token_id: int | None = None,
        add_bos: bool = False,
        add_eos: bool = False,
        chat_template: str | None = None,
    ) -> None:
        self.backend = backend
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = bos_token_id
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(int(i) for i in eos_token_ids))
        self.pad_token_id = pad_token_id
        self.add_bos = bool(add_bos and bos_token_id is not None)
        self.add_eos = bool(add_eos and self.eos_token_ids)
        self.chat_template = chat_template
        self.special_ids: set[int] = {i for i, tok in backend.get_added_tokens_decoder().items() if tok.special}
        self._template: ChatTemplate | None = None
        self._guard: SpecialTextGuard | None = None

    # -- special tokens -----------------------------------------------------------------------

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def _token_text(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.backend.id_to_token(token_id)

    @property
    def bos_token(self) -> str | None:
        return self._token_text(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return self._token_text(self.eos_token_id)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary string of one id (None when out of range)."""
        return self.backend.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        """The id of one vocabulary string (None when absent)."""
        return self.backend.token_to_id(token)

    # -- encode / decode ----------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; BOS is prepended when the model wants it (never twice)."""
        # The backend never adds specials itself (its post-processor could add a second BOS);
        # we add them here from our own flags.
        # encode_batch releases the GIL while it works (encode does not), so a megabyte prompt
        # tokenized in a worker thread leaves the server's event loop free.
        ids = self.backend.encode_batch([text], add_special_tokens=False)[0].ids
        if add_special_tokens:
            bos = self.bos_token_id  # never None when add_bos is set
            if self.add_bos and bos is not None and (not ids or ids[0] != bos):
                ids = [bos, *ids]
            if self.add_eos:
                ids = [*ids, self.eos_token_ids[0]]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`."""
        return self.backend.decode_batch([[int(i) for i in ids]], skip_special_tokens=skip_special_tokens)[0]

    # -- chat ---------------------------------------------------------------------------------

    @overload
    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: Literal[False] = False,
        **extra_vars: Any,
    ) -> str: ...

    @overload
    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool,
        tokenize: Literal[True],
        **extra_vars: Any,
    ) -> list[int]: ...

    @overload
    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tokenize: Literal[True],
        **extra_vars: Any,
    ) -> list[int]: ...

    @overload
    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **extra_vars: Any,
    ) -> str | list[int]: ...

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **extra_vars: Any,
    ) -> str | list[int]:
        """Render `messages` with the model's chat template; token ids when `tokenize`."""
        template = extra_vars.pop("chat_template", None)
        if template is not None:
            compiled = ChatTemplate(template, self._special_token_vars())
        else:
            if self.chat_template is None:
                raise ValueError("this model has no chat template; send a plain prompt instead")
            if self._template is None:
                self._template = ChatTemplate(self.chat_template, self._special_token_vars())
            compiled = self._template
        with render_limits():  # both renderings share one deadline
            text = compiled.render(messages, add_generation_prompt=add_generation_prompt, **extra_vars)
            if not tokenize:
                return text
            # Special-token text typed into a message must stay text: see SpecialTextGuard.
            guard = self._special_text_guard()
            hidden: list[str] = []
            hidden_messages = guard.hide(list(messages), hidden)
            hidden_vars = {k: guard.hide(v, hidden) for k, v in extra_vars.items()}
            if not hidden:  # the usual case: ids exactly as a plain encode gives them
                # Like transformers: the template writes BOS itself when the model wants one.
                return self.encode(text, add_special_tokens=False)
            marked = compiled.render(hidden_messages, add_generation_prompt=add_generation_prompt, **hidden_vars)
        return guard.encode(text, marked, hidden)

    def set_chat_template(self, source: str) -> None:
        """Use `source` instead of the model's own chat template; ValueError if it does not compile."""
        compiled = ChatTemplate(source, self._special_token_vars())
        self.chat_template, self._template = source, compiled

    def chat_template_uses(self, variable: str) -> bool:
        """Whether the chat template reads `variable` (e.g. "tools": whether it can show tools)."""
        if self.chat_template is None:
            return False
        if self._template is None:
            self._template = ChatTemplate(self.chat_template, self._special_token_vars())
        return variable in self._template.variables

    def _special_text_guard(self) -> SpecialTextGuard:
        if self._guard is None:  # a race only builds it twice
            self._guard = SpecialTextGuard(self.backend)
        return self._guard

    def _special_token_vars(self) -> dict[str, str | None]:
        return {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self._token_text(self.pad_token_id),
        }

    # -- constructors -------------------------------------------------------------------------

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json (+ tokenizer_config.json, chat_template.jinja, special_tokens_map.json)."""
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise ModelLoadError(f"{path} has no tokenizer.json")
        try:
            backend = BackendTokenizer.from_file(str(tok_file))
        except Exception as e:
            raise ModelLoadError(f"cannot read {tok_file}: {e}") from None
        config = _read_json(path / "tokenizer_config.json")
        special_map = _read_json(path / "special_tokens_map.json")
        # tokenizer_config wins over the legacy special_tokens_map.
        merged = {**special_map, **config}

        def token_id(key: str) -> int | None:
            name = _token_content(merged.get(key))
            return None if name is None else backend.token_to_id(name)

        bos = token_id("bos_token")
        eos = token_id("eos_token")
        pad = token_id("pad_token")
        if "add_bos_token" in config:
            add_bos = bool(config["add_bos_token"])
        else:
            # No flag: the tokenizer.json post-processor says whether BOS gets added.
            probe = backend.encode("a", add_special_tokens=True).ids
            add_bos = bos is not None and bool(probe) and probe[0] == bos
        template = _chat_template_from(path, config)
        return cls(
            backend,
            bos_token_id=bos,
            eos_token_ids=() if eos is None else (eos,),
            pad_token_id=pad,
            add_bos=add_bos,
            add_eos=bool(config.get("add_eos_token", False)),
            chat_template=template,
        )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from None
    return data if isinstance(data, dict) else {}


def _token_content(value: Any) -> str | None:
    # tokenizer_config stores special tokens either as strings or as AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _chat_template_from(path: Path, config: dict[str, Any]) -> str | None:
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


# ---------------------------------------------------------------------------------------------
# Streaming detokenization
# ---------------------------------------------------------------------------------------------


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces, never splitting a UTF-8 character.

    Keeps two offsets into the ids: text up to `_read` has been emitted; decoding restarts at
    `_prefix` (one emitted step back) so tokenizers whose decoding depends on the previous token
    (SentencePiece spaces, byte fallback runs) decode the new tokens in context. Each step decodes
    only that short window, so the cost per token does not grow with the sequence.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self._prefix_text = ""
        self._emitted = 0  # characters handed out so far

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token; return the text that became final (possibly empty)."""
        self.ids.append(int(token_id))
        text = self._decode(self.ids[self._prefix :])
        # A trailing U+FFFD means an incomplete multi-byte character: wait for the next bytes.
        if text.endswith(REPLACEMENT_CHAR) or not text.startswith(self._prefix_text):
            return ""
        piece = text[len(self._prefix_text) :]
        self._prefix, self._read = self._read, len(self.ids)
        self._prefix_text = self._decode(self.ids[self._prefix : self._read])
        self._emitted += len(piece)
        return piece

    def flush(self) -> str:
        """Emit whatever is still held back (e.g. an unfinished character at the end)."""
        # Once per stream, so a full decode is affordable and makes the joined pieces exact.
        piece = self._decode(self.ids)[self._emitted :]
        self._prefix = self._read = len(self.ids)
        self._prefix_text = ""
        self._emitted += len(piece)
        return piece

    @property
    def text(self) -> str:
        """Full decode of every id added so far."""
        return self._decode(self.ids)
