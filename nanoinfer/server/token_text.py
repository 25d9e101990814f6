"""How a token id reads in OpenAI's logprobs: its text and its UTF-8 bytes."""

from __future__ import annotations

from typing import Any

# JSON has no -inf; OpenAI-style APIs clamp impossible tokens to this instead.
MIN_LOGPROB = -9999.0


def _gpt2_byte_decoder() -> dict[str, int]:
    """Printable character -> byte, the inverse of GPT-2's byte-level BPE alphabet."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shift = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return {c: b for b, c in table.items()}


class TokenTexts:
    """Text and UTF-8 bytes of one token id as OpenAI's logprobs show them (cached per id).

    With `as_ids` (vLLM's return_tokens_as_token_ids) the text is "token_id:N" instead; the bytes
    stay the token's own."""

    def __init__(self, tokenizer: Any, as_ids: bool = False):
        self.tokenizer = tokenizer
        self.as_ids = as_ids
        decoder = getattr(getattr(tokenizer, "backend", None), "decoder", None)
        self.byte_level = "ByteLevel" in repr(decoder)
        self.byte_decoder = _gpt2_byte_decoder()
        self.cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        if token_id not in self.cache:
            raw = self._bytes(token_id)
            text = f"token_id:{token_id}" if self.as_ids else raw.decode("utf-8", errors="replace")
            self.cache[token_id] = (text, list(raw))
        return self.cache[token_id]

    def _bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.id_to_token(token_id)
        if piece is None:
            return b""
        if self.byte_level and all(c in self.byte_decoder for c in piece):
            return bytes(self.byte_decoder[c] for c in piece)
        if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:  # SentencePiece byte fallback
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        return piece.replace("\u2581", " ").encode("utf-8")


def clamp(logprob: float) -> float:
    """A finite logprob (JSON has no -inf)."""
    return max(logprob, MIN_LOGPROB)
