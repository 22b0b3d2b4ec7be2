"""Token ids -> text deltas, incrementally, with stop strings.

Each push decodes only a window of a few tokens (TGI's prefix/read offsets: decoding from a token or two back keeps
what a tokenizer needs for the next token's leading space), and feeds only the new characters to one
Knuth-Morris-Pratt matcher per stop string, whose state is also how much text to hold back; so a whole generation
costs time linear in its length. Streamed and whole answers both come from here.
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
    first stop string to complete. Once stopped, `ids` ends with the token that completed it."""

    decode: Callable[[list[int]], str]
    stop: tuple[str, ...] = ()
    ids: list[int] = field(default_factory=list)
    text: str = ""  # the text so far (whole characters), cut before a stop string once one is found
    sent: int = 0  # characters handed out
    stopped: bool = False
    prefix: int = 0  # ids[prefix:read] decode to the end of `text`; ids[read:] are not in it yet
    read: int = 0

    def __post_init__(self) -> None:
        self._matchers = [Matcher(s) for s in self.stop]
        self._hit = 0  # which stop string completed

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
            new = after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
            end = self._match(new)
            if end is None:
                self.text += new
            else:  # new[:end] completes a stop string: the text ends where it began
                self.text = (self.text + new[:end])[: len(self.text) + end - len(self.stop[self._hit])]
                self.stopped = True

    def _match(self, new: str) -> int | None:
        """Feed `new` to each stop string's matcher; the length of the part of `new` that completes the first stop
        string to complete, or None."""
        for i, ch in enumerate(new):
            done = [j for j, m in enumerate(self._matchers) if m.feed(ch)]
            if done:  # of those ending here, the longest begins first
                self._hit = max(done, key=lambda j: len(self.stop[j]))
                return i + 1
        return None

    def _stop_prefix(self) -> int:
        """Length of the longest tail of the text that begins some stop string."""
        return max((m.state for m in self._matchers), default=0)


class Matcher:
    """Knuth-Morris-Pratt over a text fed one character at a time: `state` is the length of the longest tail of the
    text so far that begins `pattern`; amortised O(1) a character."""

    def __init__(self, pattern: str) -> None:
        self.pattern, self.state = pattern, 0
        self.fail = [0] * len(pattern)  # fail[i]: the longest proper border of pattern[:i + 1]
        k = 0
        for i in range(1, len(pattern)):
            while k and pattern[i] != pattern[k]:
                k = self.fail[k - 1]
            if pattern[i] == pattern[k]:
                k += 1
            self.fail[i] = k

    def feed(self, ch: str) -> bool:
        """Take the next character; whether the text now ends with the whole pattern."""
        p, k = self.pattern, self.state
        if k == len(p):
            k = self.fail[k - 1]
        while k and p[k] != ch:
            k = self.fail[k - 1]
        if p[k] == ch:
            k += 1
        self.state = k
        return k == len(p)
