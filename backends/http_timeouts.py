"""How long an upstream may take (a backend's ``timeouts:``), and the timers that hold it to that.

``connect`` and ``total`` are aiohttp's own; ``first_token`` (the response headers of a JSON
reply, the first bytes of a stream) is a ``Deadline``, one loop timer per request; ``idle`` (the
longest gap between a stream's chunks once it has begun) is an ``IdleWatch``, one timer per
stream. Both cancel the waiting task and tell that cancel from any other, as ``asyncio.timeout``
does, for less than an ``asyncio.timeout`` per wait would cost on the hot path.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


@dataclass(slots=True)
class Timeouts:
    connect: float
    first_token: float
    total: float
    #: the longest gap between two chunks of a stream after its first
    idle: float = 30.0


class TimeoutsConfig(BaseModel):
    """A backend's ``timeouts:`` in the routing YAML, for every HTTP kind (openai, vllm, ollama)."""

    model_config = ConfigDict(extra="forbid")
    connect: float = Field(default=5.0, gt=0)
    #: until the first token: response headers for JSON replies, the first SSE bytes for streams
    first_token: float = Field(default=60.0, gt=0)
    total: float = Field(default=600.0, gt=0)
    #: the longest a stream may go without a byte once its first arrived: a stalled upstream
    #: ends the stream with an error event instead of holding the client until ``total``
    idle: float = Field(default=30.0, gt=0)

    def build(self) -> Timeouts:
        return Timeouts(connect=self.connect, first_token=self.first_token, total=self.total, idle=self.idle)


class Deadline:
    """Cancels ``task`` when its timer calls ``expire``; ``expired()`` tells that cancel from
    any other (the client leaving, say), as ``asyncio.timeout`` does."""

    __slots__ = ("_fired", "_task")

    def __init__(self, task: asyncio.Task[Any] | None) -> None:
        self._task = task
        self._fired = False

    def expire(self) -> None:
        if self._task is not None:
            self._fired = True
            self._task.cancel()

    def expired(self) -> bool:
        """True when the CancelledError being handled is this deadline's alone."""
        return self._fired and self._task is not None and self._task.uncancel() == 0


class IdleWatch:
    """Cancels a wait for upstream bytes that lasts ``idle`` seconds; ``fired()`` tells that
    cancel from any other.

    One timer per stream, moved at most once per ``idle``: each wait only notes the time, where
    an ``asyncio.timeout`` per chunk (a timer scheduled and cancelled) would cost several times
    the rest of the relay's work on that chunk.
    """

    __slots__ = ("_fired", "_loop", "_since", "_task", "_timer", "idle")

    def __init__(self, idle: float) -> None:
        self.idle = idle
        self._loop = asyncio.get_running_loop()
        self._since: float | None = None
        self._task: asyncio.Task[Any] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._fired = False

    def start(self) -> None:
        """A wait begins (call right before the await)."""
        self._since = since = self._loop.time()
        if self._timer is None:
            self._task = asyncio.current_task()
            self._timer = self._loop.call_at(since + self.idle, self._check)

    def stop(self) -> None:
        self._since = None

    def fired(self) -> bool:
        """True when the CancelledError being handled is this watch's alone."""
        return self._fired and self._task is not None and self._task.uncancel() == 0

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        since = self._since
        if since is None or self._task is None:
            return  # not waiting: the next start() arms it again
        due = since + self.idle
        if self._loop.time() >= due:
            self._fired = True
            self._task.cancel()
        else:
            self._timer = self._loop.call_at(due, self._check)
