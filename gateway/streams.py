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
    """The stream after its first chunk, reporting its end to stats and breaker exactly once.

    A class rather than an async generator: a generator closed before its first ``__anext__``
    never runs its ``finally``, and a hedge loser or a client that left early is closed just so.
    """

    def __init__(self, target: Target, prompt_tokens: int, started: float, ttft_s: float,
                 clock: Callable[[], float], first: bytes, chunks: AsyncIterator[bytes]) -> None:
        self._target = target
        self._prompt_tokens = prompt_tokens
        self._started = started
        self._ttft_s = ttft_s
        self._clock = clock
        self._chunks = chunks
        self._events = first.count(b"data:")
        self._tail = first[-_TAIL:]
        self._open = True

    def __aiter__(self) -> StreamTally:
        return self

    async def __anext__(self) -> bytes:
        if not self._open:
            raise StopAsyncIteration
        try:
            chunk = await anext(self._chunks)  # type: ignore[call-overload]
        except StopAsyncIteration:
            await self._end(True)
            raise
        except InterlockError as exc:
            if counts_as_failure(exc):
                self._target.breaker.on_failure(exc.retry_after)
            await self._end(False)
            raise
        except BaseException:
            await self.aclose()
            raise
        self._events += chunk.count(b"data:")
        self._tail = (self._tail + chunk)[-_TAIL:]
        return chunk

    async def aclose(self) -> None:
        """The client left (or a hedge lost): no verdict on the backend."""
        await self._end(None)

    async def _end(self, outcome: bool | None) -> None:
        if not self._open:
            return
        self._open = False
        try:
            await self._chunks.aclose()  # type: ignore[attr-defined]
        finally:
            stats = self._target.stats
            if outcome is None:
                stats.abandoned()
            else:
                usage = usage_from_tail(self._tail)
                completion = usage[1] if usage else max(0, self._events - _FRAMING_EVENTS)
                # the prompt estimate, as given to first_token(): it pairs the two TTFT reports
                stats.finished(outcome, self._prompt_tokens, completion,
                               total_s=self._clock() - self._started, ttft_s=self._ttft_s)
