"""The response cache's place in the request pipeline: before the router, so a hit never routes.

``Serving`` hands every request of a route with ``cache:`` to ``CacheStep.serve`` with the
call that would route it. In order: the client's ``Cache-Control`` (RFC 9111 request
directives), whether the request may be cached at all (deterministic by default), the lookup,
the single flight (identical misses in flight make one upstream call; the others replay its
answer), then the call, whose answer is recorded as it goes out (a stream chunk by chunk, as
relayed) and stored only when it is a good one. When every candidate fails, an entry within
its ``stale_if_error_s`` answers instead (RFC 5861). Every reply says what the cache did:
``x-interlock-cache: hit | miss | bypass | stale``, and ``Age`` on hits.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from backends.errors import BackendError, InterlockError
from gateway.cache import CacheConfig, Flight, Lookup, ResponseCache, cacheable
from gateway.cache_entry import StreamRecorder
from gateway.cache_key import cache_key, parse_cache_control
from gateway.errors import NotCached
from gateway.router import Opened, Served
from gateway.snapshot import Route

log = logging.getLogger("interlock.cache")

ANONYMOUS = "anonymous"


@dataclass(slots=True)
class Replayed:
    """An answer from the cache: the JSON body, or the SSE events of a stream."""

    body: bytes | None
    events: list[bytes] | None
    cache: str  # "hit" or "stale"
    age_s: float


Call = Callable[[], Awaitable[Served | Opened]]


class CacheStep:
    def __init__(self, cache: ResponseCache) -> None:
        self.cache = cache

    async def serve(
        self,
        route: Route,
        endpoint: str,
        body: dict[str, object],
        tenant: str | None,
        cache_control: str | None,
        call: Call,
    ) -> Served | Opened | Replayed:
        config = self.cache.config_for(route.cache)
        assert config is not None
        control = parse_cache_control(cache_control)
        stream = bool(body.get("stream"))
        if endpoint not in ("chat", "completions") or control.no_store or not cacheable(body, config):
            if control.only_if_cached:
                raise NotCached("This request cannot be answered from the cache (only-if-cached).")
            return _tagged(await call(), "bypass")
        key = cache_key(endpoint, tenant or ANONYMOUS, route.name, body)
        found = None if control.no_cache else await self.cache.lookup(key, max_age_s=control.max_age)
        if found is not None and found.fresh:
            return _replay(found, "hit", stream, body)
        if control.only_if_cached:
            raise NotCached("No cached answer for this request (only-if-cached).")
        flight = await self.cache.join(key, config)
        if flight.entry is not None:
            return _replay(flight.entry, "hit", stream, body)
        try:
            reply = await call()
        except InterlockError as exc:
            await flight.done()
            if found is not None and isinstance(exc, BackendError):
                log.info("serving a stale answer for %s: %s", route.name, exc.message)
                return _replay(found, "stale", stream, body)
            raise
        except BaseException:
            await flight.done()
            raise
        if isinstance(reply, Served):
            try:
                entry = self.cache.reply_from_json(endpoint, reply.reply.body, config)
                if entry is not None:
                    await self.cache.store(key, entry, config)
            finally:
                await flight.done()
            return _tagged(reply, "miss")
        recording = _Recording(
            self.cache, key, config, flight, self.cache.recorder(endpoint, config), reply.first, reply.rest
        )
        return Opened(reply.target, reply.first, recording, reply.reason, cache="miss")


def _tagged(reply: Served | Opened, cache: str) -> Served | Opened:
    reply.cache = cache
    return reply


def _replay(found: Lookup, cache: str, stream: bool, body: dict[str, object]) -> Replayed:
    if not stream:
        return Replayed(found.entry.as_json(), None, cache, found.age_s)
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
    return Replayed(None, found.entry.as_sse(include_usage), cache, found.age_s)


class _Recording:
    """A relayed stream after its first chunk, fed to a recorder; stored when it ended well.

    The flight ends however the stream ends: followers then replay the entry, or call
    upstream themselves when there is none (a cut stream, a client that left).
    """

    def __init__(
        self,
        cache: ResponseCache,
        key: str,
        config: CacheConfig,
        flight: Flight,
        recorder: StreamRecorder,
        first: bytes,
        rest: AsyncIterator[bytes],
    ) -> None:
        self._cache, self._key, self._config, self._flight = cache, key, config, flight
        self._recorder = recorder
        self._rest = rest
        recorder.feed(first)

    def __aiter__(self) -> _Recording:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await anext(self._rest)
        except StopAsyncIteration:
            try:
                entry = self._recorder.result()
                if entry is not None:
                    await self._cache.store(self._key, entry, self._config)
            finally:
                await self._flight.done()
            raise
        except BaseException:
            await self._flight.done()
            raise
        self._recorder.feed(chunk)
        return chunk

    async def aclose(self) -> None:
        try:
            await self._rest.aclose()  # type: ignore[attr-defined]
        finally:
            await self._flight.done()
