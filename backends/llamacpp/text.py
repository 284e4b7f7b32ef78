"""A reply's text as its tokens arrive: bytes to characters, and stop strings.

A token is a few bytes, not always a whole character (an emoji may span three tokens), so
bytes wait in an incremental UTF-8 decoder until a character completes. With stop strings,
text that could still be the start of one is held back until it cannot (the client never
sees part of a stop string), and the reply ends just before the first stop string found,
even one that spans tokens.
"""

from __future__ import annotations

import codecs


class ReplyText:
    """Turns one reply's token pieces into the text to send, watching for ``stops``."""

    __slots__ = ("_decoder", "_held", "_stops")

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._held = ""  # text that may be the start of a stop string

    def add(self, piece: bytes) -> tuple[str, bool]:
        """The text this piece releases, and whether a stop string ended the reply (the text
        is then what came before it; nothing may follow)."""
        text = self._decoder.decode(piece) if piece else ""
        if not (text and self._stops):
            return text, False
        text = self._held + text
        cut = min((i for i in (text.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return text[:cut], True
        keep = stop_prefix_len(text, self._stops)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """What is still held when the reply ends otherwise: a partial stop string that never
        completed, or the bytes of a character cut short (as U+FFFD), are real text."""
        tail, self._held = self._held + self._decoder.decode(b"", True), ""
        return tail


def stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of ``text`` that could still grow into a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


__all__ = ["ReplyText", "stop_prefix_len"]
