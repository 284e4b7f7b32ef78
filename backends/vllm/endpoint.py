"""One vLLM server of a ``kind: vllm`` pool: what the gateway knows of it and how it asks.

The pool (``backends.vllm``) decides; an ``Endpoint`` holds the facts it decides on: its
health, this gateway's own work there (``in_flight``, ``outstanding`` tokens, kept by
``Ticket``), the last ``/metrics`` scrape and the prefix index of prompts sent there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from backends.http import OpenAICompatibleUpstream
from backends.vllm.affinity import PrefixIndex
from backends.vllm.cost import Pending, TtftFit
from backends.vllm.metrics import MetricsSnapshot, PrefixRate, parse_metrics


def public_url(root: str) -> str:
    """The URL without credentials, as shown to operators."""
    parts = urlsplit(root)
    host = f"[{parts.hostname}]" if parts.hostname and ":" in parts.hostname else parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class Endpoint:
    def __init__(
        self, root: str, upstream: OpenAICompatibleUpstream, index: PrefixIndex, fit: TtftFit | None = None
    ) -> None:
        self.root = root
        self.url = public_url(root)
        self.upstream = upstream
        self.index = index
        self.healthy = True  # until a check says otherwise: a pool used before start() works
        self.reason = ""
        #: times it left the rotation; a health check that began before the latest one must
        #: not bring it back (it may have seen the server up just before it failed)
        self.ejections = 0
        self.failures = 0
        self.in_flight = 0
        self.outstanding = 0.0
        #: of ``outstanding``, the uncached prefill of requests with no first token yet
        self.prefill_pending = 0.0
        #: requests of ours past their first token (decoding)
        self.decoding = 0
        self.served = 0
        #: the cost model's coefficients for this server, fit from the TTFTs seen here
        self.fit = fit or TtftFit()
        self.scrape: MetricsSnapshot | None = None
        self.scraped_at: float | None = None
        self.scrape_error = ""
        self.ours_at_scrape = 0
        #: about its max_num_seqs, once it has been seen full (``_learn_capacity``), else None
        self.capacity: float | None = None
        self.max_running = 0.0
        self.prefix_rate = PrefixRate()
        self.wake = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    def eject(self, reason: str) -> bool:
        """Take it out of the rotation; True if it was in."""
        was = self.healthy
        self.healthy, self.reason = False, reason
        self.ejections += 1
        return was

    def restore(self) -> None:
        self.healthy, self.reason, self.failures = True, "", 0

    async def probe(
        self, session: aiohttp.ClientSession, headers: Mapping[str, str], limit_s: float
    ) -> str | None:
        """``GET /health``: None when it answers 200, else why not."""
        try:
            async with asyncio.timeout(limit_s):
                async with session.get(self.root + "/health", headers=headers) as r:
                    return None if r.status == 200 else f"GET /health answered {r.status}"
        except TimeoutError:
            return f"GET /health timed out after {limit_s:g}s"
        except aiohttp.ClientConnectorError:
            return "cannot connect"
        except aiohttp.ClientError as exc:
            return f"GET /health failed ({type(exc).__name__})"

    async def read_metrics(
        self, session: aiohttp.ClientSession, headers: Mapping[str, str], limit_s: float, now: float
    ) -> None:
        """Scrape ``/metrics``; a failure keeps the last snapshot (it goes stale by age)."""
        ours = self.in_flight
        try:
            async with asyncio.timeout(limit_s):
                async with session.get(self.root + "/metrics", headers=headers) as r:
                    if r.status != 200:
                        self.scrape_error = f"GET /metrics answered {r.status}"
                        return
                    text = await r.text(errors="replace")
        except (TimeoutError, aiohttp.ClientError) as exc:
            self.scrape_error = f"GET /metrics failed ({type(exc).__name__})"
            return
        snapshot = parse_metrics(text)
        self.scrape, self.scraped_at, self.scrape_error = snapshot, now, ""
        # the page was made between sending and now: of our two counts, the larger claims more of it
        self.ours_at_scrape = max(ours, self.in_flight)
        self.prefix_rate.update(snapshot.prefix_queries, snapshot.prefix_hits)
        self._learn_capacity(snapshot)

    def _learn_capacity(self, snapshot: MetricsSnapshot) -> None:
        """A scrape showing requests waiting beside several running, with KV room to spare, says
        the server was full: its running count is about its max_num_seqs. It may also be a request
        that arrived mid-step and waits for the step's end; such an underestimate is corrected by
        the most running any scrape showed (requests sent past it still go there when the others
        cost more, and the next scrape sees them running)."""
        running, waiting = snapshot.running or 0.0, snapshot.waiting or 0.0
        self.max_running = max(self.max_running, running)
        if waiting > 0 and running >= 2 and (snapshot.kv_cache_usage or 0.0) < 0.9:
            self.capacity = max(self.capacity or 0.0, running)
        if self.capacity is not None and self.capacity < self.max_running:
            self.capacity = self.max_running

    def row(self, now: float) -> dict[str, Any]:
        """Its figures for operators (``/admin/routes``); the URL carries no credentials."""
        scrape = self.scrape or MetricsSnapshot()
        return {
            "url": self.url,
            "healthy": self.healthy,
            "reason": self.reason,
            "consecutive_failures": self.failures,
            "in_flight": self.in_flight,
            "outstanding_tokens": round(self.outstanding),
            "served": self.served,
            "running": _int(scrape.running),
            "waiting": _int(scrape.waiting),
            "kv_cache_usage": scrape.kv_cache_usage,
            "prefix_hit_rate": self.prefix_rate.rate,
            "scrape_age_s": round(now - self.scraped_at, 3) if self.scraped_at is not None else None,
            "scrape_error": self.scrape_error,
            "index_blocks": len(self.index),
            "prefill_pending_tokens": round(self.prefill_pending),
            "capacity_seen": _int(self.capacity),
            "ttft_fit": self.fit.snapshot(),
        }


class Ticket:
    """One request's share of an endpoint's outstanding work, released exactly once; with
    ``pending``, its first token is a sample for the endpoint's TTFT fit."""

    __slots__ = ("decode", "decoding", "endpoint", "open", "pending", "prefill")

    def __init__(
        self, endpoint: Endpoint, prefill: float, decode: float, pending: Pending | None = None
    ) -> None:
        self.endpoint, self.prefill, self.decode, self.open = endpoint, prefill, decode, True
        self.pending, self.decoding = pending, False
        endpoint.in_flight += 1
        endpoint.outstanding += prefill + decode
        endpoint.prefill_pending += prefill
        endpoint.served += 1

    def first_token(self) -> None:
        if not self.open or self.decoding:
            return
        if self.pending is not None:
            self.pending = self.endpoint.fit.first_token(self.pending)
        self.decoding = True
        self._release_prefill()
        self.endpoint.decoding += 1

    def done(self, *, finished: bool = False) -> None:
        """Released; ``finished``: the stream ran to its end (its decode time is a sample)."""
        if self.open:
            self.open = False
            self.endpoint.in_flight -= 1
            if self.decoding:
                self.endpoint.decoding -= 1
                if self.pending is not None and finished:
                    self.endpoint.fit.finished(self.pending, self.decode)
            self._release_prefill()
            self.endpoint.outstanding = max(0.0, self.endpoint.outstanding - self.decode)

    def _release_prefill(self) -> None:
        e = self.endpoint
        e.outstanding -= self.prefill
        e.prefill_pending = max(0.0, e.prefill_pending - self.prefill)
        self.prefill = 0.0


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)


__all__ = ["Endpoint", "Ticket", "public_url"]
