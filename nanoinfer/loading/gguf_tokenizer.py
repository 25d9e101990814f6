"""Rebuild a `tokenizers` tokenizer from GGUF `tokenizer.ggml.*` metadata.

A GGUF has no tokenizer.json, only llama.cpp's description of the vocabulary. Two families occur:
  * "gpt2": byte-level BPE (SmolLM, Llama 3, Qwen). Vocab and merges are stored; the pre-tokenizer
    regex is implied by `tokenizer.ggml.pre`.
  * "llama": SentencePiece BPE (Gemma, Llama 2, Mistral v0.1). Vocab and scores are stored; merges
    are recovered from the vocabulary, with byte fallback tokens <0xNN>.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.models import BPE

from nanoinfer.errors import ModelLoadError
from nanoinfer.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Split regexes, by `tokenizer.ggml.pre` (the same expressions llama.cpp and the HF repos use).
_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}

# Tokens that end a turn. llama.cpp treats these as end-of-generation when the vocabulary has them
# as control tokens, so a chat model stops at the end of its turn, not only at the document EOS.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "<EOT>")

# Used only when the file carries no template but the vocabulary clearly speaks one of these formats.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}"
    "{{ raise_exception('Invalid content type') }}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:  # control bytes and space get shifted past 255 so every byte is visible
            table[b] = chr(256 + extra)
            extra += 1
    return table


def tokenizer_from_gguf_metadata(meta: dict[str, Any], architecture: str = "") -> Tokenizer:
    """Tokenizer described by GGUF metadata (`meta` maps GGUF keys to plain Python values)."""
    model = meta.get("tokenizer.ggml.model")
    tokens: Sequence[str] | None = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelLoadError("GGUF file has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if model == "gpt2":
        backend = _byte_level_backend(tokens, types, meta)
    elif model == "llama":
        backend = _sentencepiece_backend(tokens, types, meta, architecture)
    else:
        raise ModelLoadError(f"GGUF tokenizer model {model!r} is not supported; supported: gpt2, llama")

    bos = meta.get("tokenizer.ggml.bos_token_id")
    pad = meta.get("tokenizer.ggml.padding_token_id")
    # llama.cpp adds BOS for SentencePiece vocabularies that do not say otherwise.
    add_bos = meta.get("tokenizer.ggml.add_bos_token", model == "llama")
    add_eos = meta.get("tokenizer.ggml.add_eos_token", False)
    template = meta.get("tokenizer.chat_template") or _fallback_template(tokens)
    return Tokenizer(
        backend,
        bos_token_id=bos,
        eos_token_ids=_stop_ids(tokens, types, meta),
        pad_token_id=pad,
        add_bos=bool(add_bos),
        add_eos=bool(add_eos),
        chat_template=template,
    )


def _stop_ids(tokens: Sequence[str], types: Sequence[int], meta: dict[str, Any]) -> tuple[int, ...]:
    ids = [
        meta.get("tokenizer.ggml.eos_token_id"),
        meta.get("tokenizer.ggml.eot_token_id"),
        meta.get("tokenizer.ggml.eom_token_id"),
    ]
    wanted = set(_END_OF_TURN_TOKENS)
    ids += [i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == CONTROL and t in wanted]
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None and 0 <= i < len(tokens)))


def _fallback_template(tokens: Sequence[str]) -> str | None:
    vocab = set(tokens[:1024])  # turn markers sit among the first (special) tokens
    if "<start_of_turn>" in vocab and "<end_of_turn>" in vocab:
        return GEMMA_CHAT_TEMPLATE
    if "<|im_start|>" in vocab and "<|im_end|>" in vocab:
        return CHATML_TEMPLATE
    return None


def _add_special_tokens(
    backend: BackendTokenizer,
    tokens: Sequence[str],
    types: Sequence[int],
    vocab: dict[str, int],
    allowed: set[str] | None,
) -> None:
    # Control tokens become special (skipped when decoding); user-defined ones (like "<think>" or
    # Gemma's "\n\n") are matched whole in text but decode as ordinary text.
    control = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types)
        if ty == CONTROL and (allowed is None or set(t) <= allowed)
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, ty in zip(tokens, types)
        if ty == USER_DEFINED and t in vocab
    ]
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)


def _byte_level_backend(tokens: Sequence[str], types: Sequence[int], meta: dict[str, Any]) -> BackendTokenizer:
    table = byte_alphabet()
    alphabet = set(table.values())
    # Tokens written in plain text (outside the byte alphabet) get respelled byte by byte.
    vocab = {
        (t if set(t) <= alphabet else "".join(table[b] for b in t.encode("utf-8"))): i for i, t in enumerate(tokens)
    }
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    backend = BackendTokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False))
    pre = meta.get("tokenizer.ggml.pre") or "default"
    if pre in _SPLITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif pre == "smollm":
        # SmolLM was trained with every digit its own pre-token, then GPT-2's split.
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    else:
        if pre not in ("default", "gpt-2", "gpt2"):
            log.warning("unknown GGUF pre-tokenizer %r; using GPT-2's split", pre)
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    _add_special_tokens(backend, tokens, types, vocab, alphabet)
    return backend


def _sentencepiece_backend(
    tokens: Sequence[str], types: Sequence[int], meta: dict[str, Any], architecture: str
) -> BackendTokenizer:
    gemma = architecture.startswith("gemma")
    if gemma:
        # Gemma files spell its multi-space tokens with real spaces; the model sees them as '▁' runs.
        tokens = ["\u2581" * len(t) if t and not t.strip(" ") else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    if meta.get("tokenizer.ggml.merges"):
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    else:
        scores = meta.get("tokenizer.ggml.scores")
        # Gemma's merge order is the order of its vocabulary; elsewhere the SentencePiece score is.
        priority = [-float(i) for i in range(len(tokens))] if gemma or not scores else [float(s) for s in scores]
        merges = _merges_from_vocab(tokens, vocab, priority)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    backend = BackendTokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if meta.get("tokenizer.ggml.add_space_prefix", not gemma):
        # Llama-2 style: a '▁' before the first word, removed again when decoding.
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    else:
        backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.decoder = decoders.Sequence(dec)
    _add_special_tokens(backend, tokens, types, vocab, None)
    return backend


def _merges_from_vocab(
    tokens: Sequence[str], vocab: dict[str, int], priority: Sequence[float]
) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two tokens."""
    found: list[tuple[float, int, int, str, str]] = []
    for token, prio in zip(tokens, priority):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                found.append((prio, len(left), len(right), left, right))
    # Best token first; among the splits of one token, the longer left piece first.
    found.sort(key=lambda m: (-m[0], -m[1], -m[2]))
    return [(m[3], m[4]) for m in found]
