"""One object per attempt: one call of one backend for one request, streamed or not.

    started ──first_token()──▶ answering ──finish()──▶ ended: ok
       │                          │
       └──fail(exc) / abandon()───┴──────────────────▶ ended: failed | abandoned

The router makes an ``Attempt`` for every call it sends (hedges and retries included) and
reports to it; everything that learns from attempts is a listener: the backend's live stats,
its circuit breaker, and metrics or access logs as one more each. Whichever way an attempt
ends (a reply, an error, the client leaving, a lost hedge, a stream cut half-way) its end is
reported exactly once, here. ``fail`` decides what an exception means: a failure of the
backend (``counts_as_failure``) or no verdict at all (the client's mistake, a busy refusal,
the client leaving, a bug of the gateway's own).

``AttemptStream`` is a stream after its first chunk: it passes the bytes on untouched and
looks at them only to count events and read the usage near the end, so the stats learn the
pace of tokens and the breaker hears of streams that die half-way.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Literal, Protocol

from backends.base import Usage
from backends.errors import InterlockError
from gateway.breaker import counts_as_failure

if TYPE_CHECKING:
    from gateway.snapshot import Target

Outcome = Literal["ok", "failed", "abandoned"]


class AttemptListener(Protocol):
    def attempt_started(self, attempt: Attempt) -> None: ...
    def attempt_answered(self, attempt: Attempt) -> None: ...
    def attempt_ended(self, attempt: Attempt) -> None: ...


class Attempt:
    __slots__ = (
        "_clock",
        "_listeners",
        "error",
        "outcome",
        "prompt_tokens",
        "started_at",
        "target",
        "total_s",
        "ttft_s",
        "usage",
    )

    def __init__(
        self,
        target: Target,
        prompt_tokens: int,
        clock: Callable[[], float],
        listeners: Sequence[AttemptListener],
    ) -> None:
        self.target = target
        #: the estimate policies predict from (not the upstream's count)
        self.prompt_tokens = prompt_tokens
        self._clock = clock
        self._listeners = listeners
        self.started_at = clock()
        self.ttft_s: float | None = None
        self.total_s: float | None = None
        self.outcome: Outcome | None = None
        self.error: BaseException | None = None
        self.usage: Usage | None = None
        for listener in listeners:
            listener.attempt_started(self)

    @property
    def answered(self) -> bool:
        return self.ttft_s is not None

    def first_token(self) -> None:
        """The first token is in hand (for a reply sent whole: the reply)."""
        if self.ttft_s is None and self.outcome is None:
            self.ttft_s = self._clock() - self.started_at
            for listener in self._listeners:
                listener.attempt_answered(self)

    def finish(self, usage: Usage | None = None) -> None:
        """The reply is complete."""
        self.first_token()
        self.usage = usage
        self._end("ok")

    def fail(self, exc: BaseException) -> None:
        """The attempt raised ``exc``: a failure of the backend, or no verdict on it."""
        self.error = exc
        self._end("failed" if counts_as_failure(exc) else "abandoned")

    def abandon(self) -> None:
        """Ended with no verdict on the backend: the client left, a hedge lost."""
        self._end("abandoned")

    def _end(self, outcome: Outcome) -> None:
        if self.outcome is not None:
            return
        self.outcome = outcome
        self.total_s = self._clock() - self.started_at
        for listener in self._listeners:
            listener.attempt_ended(self)


class StatsListener:
    """Feeds each attempt into its backend's live figures (``gateway.stats``)."""

    def attempt_started(self, attempt: Attempt) -> None:
        attempt.target.stats.started()

    def attempt_answered(self, attempt: Attempt) -> None:
        assert attempt.ttft_s is not None
        attempt.target.stats.first_token(attempt.prompt_tokens, attempt.ttft_s)

    def attempt_ended(self, attempt: Attempt) -> None:
        stats = attempt.target.stats
        if attempt.outcome == "ok":
            completion = attempt.usage.completion_tokens if attempt.usage else 0
            stats.finished(True, completion, total_s=attempt.total_s, ttft_s=attempt.ttft_s)
        elif attempt.outcome == "failed":
            stats.finished(False)
        else:
            stats.abandoned()


class BreakerListener:
    """Tells each attempt's circuit breaker how it went. An answer is a success as soon as the
    first token is in hand (a half-open probe need not wait for a long stream to end); a failure,
    even half-way through a stream, is a failure; an attempt ended without a verdict before its
    answer gives its probe slot back."""

    def attempt_started(self, attempt: Attempt) -> None:
        return None  # admission (breaker.allow) happened before the call

    def attempt_answered(self, attempt: Attempt) -> None:
        attempt.target.breaker.on_success()

    def attempt_ended(self, attempt: Attempt) -> None:
        breaker = attempt.target.breaker
        if attempt.outcome == "failed":
            breaker.on_failure(getattr(attempt.error, "retry_after", None))
        elif not attempt.answered:
            breaker.release()


DEFAULT_LISTENERS: tuple[AttemptListener, ...] = (StatsListener(), BreakerListener())

_PROMPT = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
_TAIL = 4096
#: events in a stream that carry no token: the role chunk, the finish chunk, [DONE]
_FRAMING_EVENTS = 3
_DONE = b"data: [DONE]\n\n"


def usage_from_tail(tail: bytes) -> Usage | None:
    """Token counts from the last usage object in a stream's tail, if any."""
    at = tail.rfind(b'"usage"')
    if at < 0:
        return None
    prompt, completion = _PROMPT.search(tail, at), _COMPLETION.search(tail, at)
    if prompt is None or completion is None:
        return None
    return Usage(int(prompt.group(1)), int(completion.group(1)))


class AttemptStream:
    """A stream after its first chunk, ending its attempt exactly once however it ends.

    A class rather than an async generator: a generator closed before its first ``__anext__``
    never runs its ``finally``, and a hedge loser or a client that left early is closed just so.
    """

    def __init__(self, attempt: Attempt, first: bytes, chunks: AsyncIterator[bytes]) -> None:
        self._attempt = attempt
        self._chunks = chunks
        self._events = first.count(b"data:")
        self._tail = first[-_TAIL:]
        self._open = True

    def __aiter__(self) -> AttemptStream:
        return self

    async def __anext__(self) -> bytes:
        if not self._open:
            raise StopAsyncIteration
        try:
            chunk = await anext(self._chunks)
        except StopAsyncIteration:
            await self._close()
            self._finish()
            raise
        except InterlockError as exc:
            await self._close()
            self._attempt.fail(exc)
            raise
        except BaseException:
            await self.aclose()
            raise
        self._events += chunk.count(b"data:")
        self._tail = (self._tail + chunk)[-_TAIL:]
        return chunk

    async def aclose(self) -> None:
        """The client left (or a hedge lost): no verdict on the backend, unless the answer was
        whole already (its ``[DONE]`` passed: a client may hang up once it has read it)."""
        if self._open:
            await self._close()
            if self._tail.endswith(_DONE):
                self._finish()
            else:
                self._attempt.abandon()

    def _finish(self) -> None:
        usage = usage_from_tail(self._tail)
        if usage is None:
            usage = Usage(0, max(0, self._events - _FRAMING_EVENTS))
        self._attempt.finish(usage)

    async def _close(self) -> None:
        self._open = False
        await self._chunks.aclose()  # type: ignore[attr-defined]
