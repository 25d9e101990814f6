#!/usr/bin/env python
"""Cost of parsing tool calls as they stream: one long Hermes call fed a few characters at a time.

    .venv/bin/python benchmarks/tool_parser_speed.py

Prints the time per answer and per token (4 characters per token, about what BPE vocabularies
give on code), for each parser on a call in its own format.
"""

from __future__ import annotations

import json
import time

from nanoinfer.server.tool_parsers import HermesParser, JsonArrayParser, Llama3JsonParser, MistralParser

ARGUMENTS = json.dumps({"code": "def f(x):\n    return x * 2\n" * 40, "items": list(range(50))})
CASES = {
    "hermes": (HermesParser, f'<tool_call>\n{{"name": "write_file", "arguments": {ARGUMENTS}}}\n</tool_call>'),
    "llama3_json": (Llama3JsonParser, f'{{"name": "write_file", "parameters": {ARGUMENTS}}}'),
    "mistral": (MistralParser, f'[TOOL_CALLS][{{"name": "write_file", "arguments": {ARGUMENTS}}}]'),
    "json_array": (JsonArrayParser, f'[{{"name": "write_file", "parameters": {ARGUMENTS}}}]'),
}
CHARS_PER_TOKEN = 4
REPEATS = 50


def main() -> None:
    for name, (parser_cls, text) in CASES.items():
        pieces = [text[i : i + CHARS_PER_TOKEN] for i in range(0, len(text), CHARS_PER_TOKEN)]
        best = float("inf")
        for _ in range(REPEATS):
            start = time.perf_counter()
            parser = parser_cls()
            for piece in pieces:
                parser.feed(piece)
            parser.close()
            best = min(best, time.perf_counter() - start)
        print(
            f"{name:12s} {len(text)} chars, {len(pieces)} tokens: {best * 1e3:.2f} ms, {best / len(pieces) * 1e6:.1f} us/token"
        )


if __name__ == "__main__":
    main()
