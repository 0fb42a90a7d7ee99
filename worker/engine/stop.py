"""Stop strings matched on the generated text (docs/protocol.md), across token boundaries.

`StopMatcher.push(text)` takes each newly decoded piece of text and returns what may be
streamed now. Text that could still be the beginning of a stop string is held back until
the following text decides it; when a stop string completes, everything before it is
released, the stop string and anything after it are dropped, and `stopped` becomes true.
Which stop string wins does not depend on how the text is cut into pieces: it is the one
that completes first reading the text character by character (the longest, if several
complete at the same character).
`flush()` releases whatever is still held once generation ends for another reason, so no
text is ever lost.

Correctness argument for the hold-back rule: the matcher holds the longest suffix of the
pending text that is a proper prefix of some stop string. Any stop occurrence that starts
in already released text would make a longer such suffix, so it cannot exist; searching the
held text plus the new piece therefore finds every match (the first occurrence of a stop
string is also the one that completes first).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["StopMatcher"]


class StopMatcher:
    """Streams text through a set of stop strings (empty strings are ignored)."""

    __slots__ = ("_held", "matched", "stopped", "stops")

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self.stops: tuple[str, ...] = tuple(dict.fromkeys(s for s in stops if s))
        self._held = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended generation

    @property
    def held(self) -> str:
        """Text received but not yet released (a possible start of a stop string)."""
        return self._held

    def push(self, text: str) -> str:
        """Feed newly generated text; return the text that is safe to stream now."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buf = self._held + text
        best: tuple[int, int] | None = None  # (end, start) of the match that completes first
        for s in self.stops:
            pos = buf.find(s)
            if pos >= 0 and (best is None or (pos + len(s), pos) < best):
                best = (pos + len(s), pos)
                self.matched = s
        if best is not None:
            self._held = ""
            self.stopped = True
            return buf[: best[1]]
        keep = self._partial_suffix(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """Release the held text (generation ended without completing a stop string)."""
        out, self._held = self._held, ""
        return out

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of a stop string."""
        longest = max(len(s) for s in self.stops) - 1
        for n in range(min(longest, len(buf)), 0, -1):
            tail = buf[-n:]
            if any(len(s) > n and s.startswith(tail) for s in self.stops):
                return n
        return 0
