"""Open streams end with an error event, not a cut, when the gateway stops.

uvicorn's graceful shutdown waits ``timeout_graceful_shutdown`` for in-flight requests and then
cancels them, which cuts a stream mid-body: the client sees a broken chunked response and no
error to act on. So shortly before that moment every stream still relayed ends here with the
documented in-stream error event and ``data: [DONE]`` (``gateway.inference.relay`` writes them
for the ``ShuttingDown`` raised here), and its connection then closes cleanly.

One ``StreamCutoff`` per event loop (a process serves on one; tests run several gateways, each on
a loop of its own), so the ASGI app needs no handle on the server to find it.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator

from gateway.errors import ShuttingDown

#: how long before uvicorn's cancel the streams end: 1 s, or a tenth of a shorter grace period
_MARGIN_S = 1.0
_MARGIN_SHARE = 0.1


class StreamCutoff:
    """The streams of one event loop and, once a shutdown began, the moment they must end."""

    def __init__(self) -> None:
        #: set once the cut-off passed: streams still open end at their next chunk
        self.passed = False
        self._waiting: set[_Guarded] = set()
        self._timer: asyncio.TimerHandle | None = None

    def begin(self, grace_s: float) -> None:
        """Shutdown started; uvicorn cancels what is left ``grace_s`` from now."""
        if self._timer is not None or self.passed:
            return
        delay = max(0.0, grace_s - min(_MARGIN_S, grace_s * _MARGIN_SHARE))
        self._timer = asyncio.get_running_loop().call_later(delay, self.cut)

    def cut(self) -> None:
        """End every open stream now: those waiting on their upstream at once, the rest at their
        next chunk."""
        self.passed = True
        for stream in list(self._waiting):
            stream.interrupt()


_cutoffs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, StreamCutoff] = weakref.WeakKeyDictionary()


def stream_cutoff() -> StreamCutoff:
    """The running loop's ``StreamCutoff``."""
    loop = asyncio.get_running_loop()
    cutoff = _cutoffs.get(loop)
    if cutoff is None:
        cutoff = _cutoffs[loop] = StreamCutoff()
    return cutoff


def until_shutdown(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """``chunks``, ending with ``ShuttingDown`` at the running loop's cut-off."""
    return _Guarded(chunks, stream_cutoff())


class _Guarded:
    """A class rather than an async generator: closing it must reach ``chunks`` even when it was
    never iterated, and each chunk costs a set add and discard, no timer."""

    __slots__ = ("_chunks", "_cutoff", "_interrupted", "_task")

    def __init__(self, chunks: AsyncIterator[bytes], cutoff: StreamCutoff) -> None:
        self._chunks = chunks
        self._cutoff = cutoff
        self._task: asyncio.Task[object] | None = None
        self._interrupted = False

    def __aiter__(self) -> _Guarded:
        return self

    async def __anext__(self) -> bytes:
        cutoff = self._cutoff
        if cutoff.passed:
            raise ShuttingDown()
        self._task = asyncio.current_task()
        cutoff._waiting.add(self)
        try:
            return await anext(self._chunks)
        except asyncio.CancelledError:
            # only our own cancel becomes the error event; anyone else's (the client left,
            # uvicorn gave up) stays a cancel
            task = self._task
            if self._interrupted and task is not None and task.uncancel() == 0:
                raise ShuttingDown() from None
            raise
        finally:
            cutoff._waiting.discard(self)

    def interrupt(self) -> None:
        if not self._interrupted and self._task is not None:
            self._interrupted = True
            self._task.cancel()

    async def aclose(self) -> None:
        self._cutoff._waiting.discard(self)
        await self._chunks.aclose()  # type: ignore[attr-defined]
