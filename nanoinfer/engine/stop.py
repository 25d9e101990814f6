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
        held = 0
        for s in self.stop:
            # Longest k < len(s) with text ending in s[:k]; only k > held can matter.
            for k in range(min(len(s) - 1, len(text)), held, -1):
                if text.endswith(s[:k]):
                    held = k
                    break
        return len(text) - held
