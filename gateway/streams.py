"""Watching a relayed SSE stream just enough to learn from it.

The relay passes bytes through untouched (no decode/re-encode per chunk); this looks
at them only to count events and find the usage object near the end, so the live
stats learn the pace of tokens and the breaker hears of streams that die half-way.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from backends.errors import InterlockError
from gateway.breaker import counts_as_failure

if TYPE_CHECKING:
    from gateway.router import Target

_PROMPT = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
_TAIL = 4096
#: events in a stream that carry no token: the role chunk, the finish chunk, [DONE]
_FRAMING_EVENTS = 3


def usage_from_tail(tail: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens from the last usage object in the stream's tail, if any."""
    at = tail.rfind(b'"usage"')
    if at < 0:
        return None
    prompt, completion = _PROMPT.search(tail, at), _COMPLETION.search(tail, at)
    if prompt is None or completion is None:
        return None
    return int(prompt.group(1)), int(completion.group(1))


class StreamTally:
    def __init__(self, target: Target, prompt_tokens: int, started: float, ttft_s: float,
                 clock: Callable[[], float]) -> None:
        self._target = target
        self._prompt_tokens = prompt_tokens
        self._started = started
        self._ttft_s = ttft_s
        self._clock = clock

    async def watch(self, first: bytes, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """The stream after ``first`` (already sent), reporting its end to stats and breaker."""
        events = first.count(b"data:")
        tail = first[-_TAIL:]
        outcome: bool | None = None  # None: the client left; says nothing about the backend
        try:
            async for chunk in chunks:
                events += chunk.count(b"data:")
                tail = (tail + chunk)[-_TAIL:]
                yield chunk
            outcome = True
        except InterlockError as exc:
            outcome = False
            if counts_as_failure(exc):
                self._target.breaker.on_failure(exc.retry_after)
            raise
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]
            stats = self._target.stats
            if outcome is None:
                stats.abandoned()
            else:
                usage = usage_from_tail(tail)
                completion = usage[1] if usage else max(0, events - _FRAMING_EVENTS)
                # the prompt estimate, as given to first_token(): it pairs the two TTFT reports
                stats.finished(outcome, self._prompt_tokens, completion,
                               total_s=self._clock() - self._started, ttft_s=self._ttft_s)
