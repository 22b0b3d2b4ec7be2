"""Token ids -> text deltas, incrementally, with stop strings.

Each push decodes only a window of a few tokens (TGI's prefix/read offsets: decoding from a token or two back keeps
what a tokenizer needs for the next token's leading space), and looks for stop strings only where the new text can
complete one, so a whole generation costs time linear in its length. Streamed and whole answers both come from here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

MAX_STOPS = 4  # stop strings a request may give (OpenAI's limit)
MAX_STOP_CHARS = 512  # characters each
MAX_PENDING = 8  # tokens held back waiting for a character to complete before they are shown as they are


@dataclass
class TextStream:
    """Holds back a partial UTF-8 character and any tail that could begin a stop string; the text ends before the
    first stop string. Once stopped, `ids` ends with the token that completed the stop string."""

    decode: Callable[[list[int]], str]
    stop: tuple[str, ...] = ()
    ids: list[int] = field(default_factory=list)
    text: str = ""  # the text so far (whole characters), cut before a stop string once one is found
    sent: int = 0  # characters handed out
    stopped: bool = False
    prefix: int = 0  # ids[prefix:read] decode to the end of `text`; ids[read:] are not in it yet
    read: int = 0

    def push(self, tokens: list[int], final: bool = False) -> str:
        """Take the next tokens; return the text that may be shown now (all of it when `final`)."""
        if self.stopped:
            return ""
        if self.stop:
            for t in tokens:  # one by one: the token that completes a stop string is the last one kept
                self._add([t])
                if self.stopped:
                    break
        elif tokens:
            self._add(tokens)
        if final and not self.stopped:
            self._add([], flush=True)
        end = len(self.text)
        if not final and not self.stopped:
            end -= self._stop_prefix()
        delta = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return delta

    def _add(self, tokens: list[int], flush: bool = False) -> None:
        self.ids += tokens
        if self.read == len(self.ids) and not flush:
            return
        before = self.decode(self.ids[self.prefix:self.read])
        after = self.decode(self.ids[self.prefix:])
        waiting = after.endswith("\ufffd") and len(self.ids) - self.read <= MAX_PENDING
        if flush or (len(after) > len(before) and not waiting):
            old = len(self.text)
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
            self._find_stop(old)

    def _find_stop(self, old: int) -> None:
        """Cut the text before the first stop string; only one that ends in the text added after `old` is new."""
        if not self.stop:
            return
        start = max(0, old - max(map(len, self.stop)) + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True

    def _stop_prefix(self) -> int:
        """Length of the longest tail of the text that begins some stop string (at most MAX_STOP_CHARS - 1)."""
        longest = 0
        for s in self.stop:
            tail = self.text[max(0, len(self.text) - len(s) + 1):] if len(s) > 1 else ""
            i = tail.find(s[0])
            while i >= 0:
                if s.startswith(tail[i:]):
                    longest = max(longest, len(tail) - i)
                    break
                i = tail.find(s[0], i + 1)
        return longest
