"""Reading transformers' outputs in tests."""

from __future__ import annotations

from typing import Any


def as_ids(value: Any) -> list[int]:
    """Token ids from transformers' apply_chat_template, which may return a BatchEncoding or dict."""
    if isinstance(value, dict) or hasattr(value, "input_ids"):
        value = value["input_ids"]
    return list(value)
