"""Incremental detokenization with stop strings: text deltas as tokens arrive.

A token can end inside a multi-byte character, so text is decoded over a short window of recent
tokens and a delta is released only once it no longer ends in an incomplete character (U+FFFD).
Stop strings: text that could still become the start of a stop string is held back; when one
appears, the text is cut before it and the request stops.
"""

from __future__ import annotations

_INCOMPLETE = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] = (), skip_special_tokens: bool = True) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must not be empty")
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # window start: tokens before it are fully emitted
        self._read = 0  # tokens whose text is in `text`
        self.text = ""  # decoded so far (including held-back text)
        self._emitted = 0  # characters of `text` released
        self.stopped_by: str | None = None

    def push(self, token_ids: list[int]) -> str:
        """Add tokens; -> the text that is now safe to emit ('' while waiting)."""
        if self.stopped_by is not None:
            return ""
        self.ids.extend(token_ids)
        before = self._decode(self.ids[self._prefix : self._read])
        now = self._decode(self.ids[self._prefix :])
        if len(now) > len(before) and not now.endswith(_INCOMPLETE):
            self.text += now[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """End of generation: release what was held back (a partial stop string is just text)."""
        if self.stopped_by is None and self._read < len(self.ids):
            tail = self._decode(self.ids[self._prefix :])[len(self._decode(self.ids[self._prefix : self._read])) :]
            self.text += tail.rstrip(_INCOMPLETE)
            self._read = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped_by is None:
            for s in self.stop:  # cutting at each found stop string leaves the earliest
                at = self.text.find(s, max(0, self._emitted - len(s) + 1))
                if at >= 0:
                    self.text, self.stopped_by = self.text[:at], s
        end = len(self.text)
        if self.stopped_by is None and not final:
            end -= self._held_back()
        delta = self.text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return delta

    def _held_back(self) -> int:
        """Length of the longest suffix of the unreleased text that starts some stop string."""
        tail = self.text[self._emitted :]
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(tail)), longest, -1):
                if s.startswith(tail[-n:]):
                    longest = n
                    break
        return longest

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""
