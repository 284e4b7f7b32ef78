"""``kind: vllm``: a pool of vLLM servers serving one model, routed for prefix-cache hits.

Each request goes to one endpoint of the pool, chosen per ``routing``:

``auto`` (default) sends each request where its first token is expected soonest, in time
(``backends.vllm.cost``)::

    ttft(e) = base + prefill_cost * (prefill_ahead(e) + uncached(e)) + per_seq * running(e)
              + step_time * full_wait_steps(e)
    uncached(e)      = prompt_tokens - tokens of the prompt's prefix e probably holds (PrefixIndex)
    prefill_ahead(e) = uncached prefill of what this gateway sent e that has no first token yet,
                       plus other clients' requests waiting there (scrape) at this pool's typical size
    running(e)       = this gateway's requests in flight there, plus other clients' running (scrape)
    full_wait_steps  = decode steps until a slot frees, once e is past the capacity it was seen
                       full at (two scrapes in a row with requests waiting beside the same
                       running count) or its KV cache is over 90% used

so the prefix cache is worth exactly the prefill time it saves, and a busier endpoint loses a
request once its queue costs more than that. ``base``, ``prefill_cost`` and ``per_seq`` are fit
per endpoint from the TTFTs of its streams (recursive least squares from defaults for an 8B model
on one data-centre GPU, robust to outliers, bounded); ``step_time`` is measured from its streams'
decode. Nothing needs tuning per model or GPU. ``load_guard`` (unset by default) is an optional
hard cap: an endpoint more than that many tokens of queued work busier than the least busy is
not chosen. Estimates within one prompt block's prefill time (``prefix_block_chars / 4``
tokens) of the best are a tie, won by the longest cached prefix, then by the
``x-interlock-session`` key through rendezvous
hashing (every replica picks alike, a conversation stays put), otherwise a per-process
``random.Random`` seeded from ``os.urandom`` does, so gateway replicas do not all herd onto the
same endpoint. Each decision (the endpoint, the cached prefix expected there, every endpoint's
expected TTFT with its wait, own prefill and the prefill its cache saves) goes to the debug log
and to ``describe()`` (``/admin/routes``, the last ``DECISIONS_KEPT``).

Prompt lengths are estimated (characters / 4, no tokenizer); the rule itself is
``backends.vllm.affinity.decide``, a pure function of per-endpoint snapshots.

``round_robin``, ``least_in_flight`` and ``conversation_hash`` (the session key, else the
conversation's opening messages, hashed onto the healthy endpoints) exist to compare rules.

Failures: an endpoint leaves the rotation at once when its ``GET /health`` fails (a failed
request triggers a check right away) or after ``eject_after_failures`` (3) consecutive
connection errors or 5xx; a scheduled health check that passes brings it back. A request
that fails on an endpoint with a connection error or a 5xx is retried on another one (at
most once per healthy endpoint); a stream only if nothing had come yet. With no healthy
endpoint the pool raises ``BackendUnavailable``, so the router falls back. Who is in the pool
(static list or DNS), the health checks and the scrapes are ``backends.vllm.members``; the
settings are ``backends.vllm.config``.

What vLLM's errors mean for the endpoint, a retry and the client is ``backends.vllm.errors``;
the body vLLM gets (bodies it mishandles refused before sending) and what the pool routes on
are ``backends.vllm.request``; the decisions kept for ``/admin/routes`` are
``backends.vllm.decisions``.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from backends.base import BackendRequest, BackendResponse, Health, Load, Resources
from backends.errors import BackendUnavailable, InterlockError
from backends.http_timeouts import Timeouts
from backends.vllm.affinity import CHARS_PER_TOKEN, Ask, Candidate, Decision, decide
from backends.vllm.config import VllmConfig, endpoint_root, split_host_port
from backends.vllm.cost import EndpointLoad
from backends.vllm.decisions import DECISIONS_KEPT, DecisionLog
from backends.vllm.endpoint import Endpoint, Ticket
from backends.vllm.errors import client_error, endpoint_fault, retry_elsewhere
from backends.vllm.members import Members
from backends.vllm.request import Plan, plan_request

#: what a request of unknown size costs (prefill, decode), until this pool has seen its own traffic
_TYPICAL_PREFILL = 384.0
_TYPICAL_DECODE = 128.0

T = TypeVar("T")


class VllmBackend:
    kind = "vllm"

    def __init__(
        self,
        name: str,
        config: VllmConfig,
        resources: Resources,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.config = config
        #: per process, never shared: replicas must not break ties alike
        self._rng = rng or random.Random(os.urandom(16))
        self._clock = clock
        self._headers = {"content-type": "application/json"}
        self._key = config.api_key.get_secret_value() if config.api_key else ""
        if self._key:
            self._headers["authorization"] = f"Bearer {self._key}"
        t = config.timeouts
        self._block_tokens = config.prefix_block_chars / CHARS_PER_TOKEN
        self._typical_prefill = _TYPICAL_PREFILL
        self._typical_decode = _TYPICAL_DECODE
        self._turn = 0
        self._decisions = DecisionLog(name)
        self._members = Members(
            name,
            config,
            resources.http,
            headers=self._headers,
            secret=self._key,
            timeouts=Timeouts(connect=t.connect, first_token=t.first_token, total=t.total, idle=t.idle),
            clock=clock,
        )

    @property
    def members(self) -> Members:
        """The endpoints, their health and their scrapes (``backends.vllm.members``)."""
        return self._members

    async def start(self) -> None:
        await self._members.start()

    async def close(self) -> None:
        await self._members.close()

    # -- choosing an endpoint -------------------------------------------------------------------

    def _plan(self, request: BackendRequest) -> Plan:
        return plan_request(request, self.config.model, self.config.prefix_block_chars)

    def _load(self, endpoint: Endpoint) -> tuple[EndpointLoad, float]:
        """What is queued and running there (the cost model's view), and the same in tokens of
        work (the ``load_guard`` cap's): ours, plus what the fresh scrape saw beyond ours."""
        foreign_running = foreign_waiting = 0.0
        waiting, kv = 0.0, None
        scrape = self._members.fresh(endpoint)
        if scrape is not None:
            running_seen, waiting = scrape.running or 0.0, scrape.waiting or 0.0
            foreign = max(0.0, running_seen + waiting - endpoint.ours_at_scrape)
            foreign_waiting = min(foreign, waiting)
            foreign_running = foreign - foreign_waiting
            kv = scrape.kv_cache_usage
        ours_decode = max(0.0, endpoint.outstanding - endpoint.prefill_pending)
        running = endpoint.in_flight + foreign_running
        load = EndpointLoad(
            prefill_ahead=endpoint.prefill_pending + foreign_waiting * self._typical_prefill,
            running=running,
            waiting=waiting,
            kv_usage=kv,
            decode_left_per_seq=(ours_decode + foreign_running * self._typical_decode / 2)
            / max(1.0, running),
            capacity=endpoint.capacity,
        )
        queued = endpoint.outstanding + (foreign_running + foreign_waiting) * (
            self._typical_prefill + self._typical_decode
        )
        return load, queued

    def _choose(self, plan: Plan, exclude: Sequence[Endpoint] = ()) -> tuple[Endpoint, Decision] | None:
        endpoints = {e.root: e for e in self._members.healthy(exclude)}
        if not endpoints:
            return None
        now = self._clock()
        auto = self.config.routing == "auto"
        candidates = []
        for e in endpoints.values():
            if auto:
                load, queued = self._load(e)
                candidates.append(
                    Candidate(
                        e.root, e.index.match(plan.keys, now), queued, e.in_flight, load, e.fit.coefficients
                    )
                )
            else:
                candidates.append(Candidate(e.root, in_flight=e.in_flight))
        ask = Ask(plan.tokens, plan.session, plan.conversation)
        self._turn += 1
        decision = decide(
            self.config.routing,
            candidates,
            ask,
            block_tokens=self._block_tokens,
            rng=self._rng,
            turn=self._turn - 1,
            load_guard=self.config.load_guard,
        )
        return endpoints[decision.chosen.name], decision

    def choose(self, request: BackendRequest) -> str | None:
        """The URL of the endpoint this request would go to now (nothing is sent or recorded)."""
        chosen = self._choose(self._plan(request))
        return chosen[0].url if chosen else None

    def _dispatch(self, endpoint: Endpoint, plan: Plan, decision: Decision) -> Ticket:
        now = self._clock()
        cached = endpoint.index.match(plan.keys, now) * self._block_tokens
        if plan.keys:
            # Counted cached from now, before the server computed it: the next requests sharing the
            # prefix queue behind this prefill there (the cost model counts it ahead of them) and
            # then find it cached, rather than each computing it cold elsewhere.
            endpoint.index.record(plan.keys, now)
        prefill = max(0.0, plan.tokens - cached)
        self._typical_prefill = 0.9 * self._typical_prefill + 0.1 * prefill
        self._typical_decode = 0.9 * self._typical_decode + 0.1 * plan.decode
        estimate = decision.estimates.get(endpoint.root)
        self._decisions.record(
            decision,
            routing=self.config.routing,
            endpoint_url=endpoint.url,
            urls={e.root: e.url for e in self._members},
            request_id=plan.request_id,
            prompt_tokens=plan.tokens,
        )
        # the fit learns from what the model predicted with (only streams have a first token)
        pending = endpoint.fit.begin(estimate.features) if estimate is not None else None
        return Ticket(endpoint, prefill, plan.decode, pending)

    # -- serving --------------------------------------------------------------------------------

    async def complete(self, request: BackendRequest) -> BackendResponse:
        plan = self._plan(request)

        async def send(endpoint: Endpoint, ticket: Ticket) -> BackendResponse:
            try:
                body, usage = await endpoint.upstream.complete(plan.path, plan.body, request.request_id)
            finally:
                ticket.done()
            return BackendResponse(body=body, usage=usage)

        return await self._on_pool(plan, send)

    async def stream(self, request: BackendRequest) -> AsyncIterator[bytes]:
        plan = self._plan(request)

        async def send(endpoint: Endpoint, ticket: Ticket) -> AsyncIterator[bytes]:
            chunks = await endpoint.upstream.stream(plan.path, plan.body, request.request_id)
            ticket.first_token()  # the first bytes are in hand: the prefill is done
            return _PoolStream(self, ticket, chunks)

        return await self._on_pool(plan, send)

    async def _on_pool(self, plan: Plan, send: Callable[[Endpoint, Ticket], Awaitable[T]]) -> T:
        """``send`` on the best endpoint; when it fails before anything reached the client with a
        connection error or a 5xx, on the next best, at most once per healthy endpoint."""
        tried: list[Endpoint] = []
        last: InterlockError | None = None
        for _ in range(max(1, len(self._members.healthy()))):
            chosen = self._choose(plan, tried)
            if chosen is None:
                break
            endpoint, decision = chosen
            tried.append(endpoint)
            ticket = self._dispatch(endpoint, plan, decision)
            try:
                result = await send(endpoint, ticket)
            except InterlockError as exc:
                ticket.done()
                last = self._failed(endpoint, exc, plan.prompt_field)
                if not retry_elsewhere(last):
                    raise last from None
                continue
            except BaseException:
                ticket.done()
                raise
            endpoint.failures = 0
            return result
        raise last or self._none_healthy()

    def _failed(self, endpoint: Endpoint, exc: InterlockError, prompt: str | None = None) -> InterlockError:
        """Count an endpoint's failure, and map what vLLM said into what a client should see."""
        if endpoint_fault(exc):
            endpoint.failures += 1
            if endpoint.failures >= self.config.eject_after_failures:
                reason = f"{endpoint.failures} consecutive failures, last: {exc.message}"
                self._members.eject(endpoint, reason)
            endpoint.wake.set()  # check it now rather than at the next interval
        return client_error(exc, prompt)

    def _none_healthy(self) -> BackendUnavailable:
        total = len(self._members)
        return BackendUnavailable(
            f"no healthy endpoint in the vLLM pool ({total} of {total} down)"
            if total
            else "the vLLM pool has no endpoints"
        )

    # -- what the gateway reads -----------------------------------------------------------------

    async def health(self) -> Health:
        endpoints = list(self._members)
        if not endpoints:
            return Health(False, f"no endpoints resolved from {self.config.dns}")
        dead = [f"{e.url} ({e.reason or 'down'})" for e in endpoints if not e.healthy]
        if len(dead) == len(endpoints):
            return Health(False, "no healthy endpoint: " + ", ".join(dead))
        return Health(True, "unhealthy: " + ", ".join(dead) if dead else "")

    def load(self) -> Load:
        queued = 0
        for endpoint in self._members:
            scrape = self._members.fresh(endpoint)
            if scrape is not None and scrape.waiting:
                queued += int(scrape.waiting)
        return Load(in_flight=sum(e.in_flight for e in self._members), queued=queued)

    def fatal(self) -> str | None:
        return None  # remote servers' faults are their own: health() reports them

    def describe(self) -> dict[str, object]:
        return {"endpoints": self.endpoints(), "decisions": self.decisions()}

    def decisions(self, last: int = DECISIONS_KEPT) -> list[dict[str, Any]]:
        """The last routing decisions, oldest first: per request, the endpoint chosen, the cached
        prefix expected there and every endpoint's expected TTFT with its parts."""
        return self._decisions.last(last)

    def endpoints(self) -> list[dict[str, Any]]:
        """Per-endpoint figures for operators (``/admin/routes``); URLs carry no credentials."""
        now = self._clock()
        return [e.row(now) for e in self._members]


class _PoolStream:
    """The upstream's SSE relay, releasing the endpoint's ticket when it ends however it ends."""

    def __init__(self, pool: VllmBackend, ticket: Ticket, chunks: AsyncIterator[bytes]) -> None:
        self._pool, self._ticket, self._chunks = pool, ticket, chunks
        self._started = False

    def __aiter__(self) -> _PoolStream:
        return self

    async def __anext__(self) -> bytes:
        self._started = True
        try:
            return await anext(self._chunks)
        except StopAsyncIteration:
            self._ticket.done(finished=True)
            raise
        except InterlockError as exc:
            self._ticket.done()
            self._pool._failed(self._ticket.endpoint, exc)  # too late to retry; the pool learns
            raise
        except BaseException:
            self._ticket.done()
            raise

    async def aclose(self) -> None:
        try:
            if not self._started:
                # An async generator never started ignores aclose(): its cleanup, which closes the
                # upstream connection, would not run. Its first chunk is already in hand.
                self._started = True
                with contextlib.suppress(StopAsyncIteration, InterlockError):
                    await anext(self._chunks)
            await self._chunks.aclose()  # type: ignore[attr-defined]
        finally:
            self._ticket.done()


__all__ = ["VllmBackend", "VllmConfig", "endpoint_root", "split_host_port"]
