"""Stop strings on streamed text: find them across token boundaries, hold back what might start one."""

from __future__ import annotations

from collections.abc import Sequence


class StopChecker:
    """Watches one sequence's growing output text for any of its stop strings."""

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must not be empty")
        self.stop = list(stop)
        self.include_stop_str_in_output = include_stop_str_in_output
        self._longest = max((len(s) for s in self.stop), default=0)
        self._ends = [_pair_ends(s) for s in self.stop]

    def check(self, text: str, new_start: int) -> int | None:
        """Length to cut `text` to if a stop string now occurs in it, else None.

        `text` is the whole output so far and text[new_start:] the part added since the last
        call (earlier text was already checked). When several stop strings occur, the one that
        is completed first (earliest end, then earliest start) wins, which is what character-by-
        character streaming would find, whatever the token boundaries.
        """
        if not self.stop:
            return None
        # A stop completed by the new piece ends after new_start, so it starts no earlier than this.
        search_from = max(0, new_start - self._longest + 1)
        best: tuple[int, int] | None = None  # (end, start)
        for s in self.stop:
            start = text.find(s, search_from)
            if start != -1 and (best is None or (start + len(s), start) < best):
                best = (start + len(s), start)
        if best is None:
            return None
        end, start = best
        return end if self.include_stop_str_in_output else start

    def safe_prefix_len(self, text: str) -> int:
        """How much of `text` can be emitted now: all but its longest suffix that begins a stop string.

        Assumes `check` found no complete stop string in `text`.
        """
        # Runs once per generated token, so it must not try every prefix of every stop string:
        # a prefix s[:k] (k >= 2) can only match if it ends with the text's last two characters,
        # and _ends lists exactly those k, longest first.
        held = 0
        last_two = text[-2:]
        for s, ends in zip(self.stop, self._ends):
            for k in ends.get(last_two, ()):
                if k <= held:
                    break  # the rest are shorter still
                if k <= len(text) and text.endswith(s[:k]):
                    held = k
                    break
            if held == 0 and len(s) > 1 and text[-1:] == s[0]:
                held = 1
        return len(text) - held


def _pair_ends(s: str) -> dict[str, list[int]]:
    """For each pair of characters: every k in [2, len(s)) with s[k-2:k] equal to it, descending."""
    ends: dict[str, list[int]] = {}
    for k in range(len(s) - 1, 1, -1):
        ends.setdefault(s[k - 2 : k], []).append(k)
    return ends
