"""Limits and budgets per client key: which checks a request faces, and which tier decides them.

A request with key K for model M faces the limits of K (or of ``*``) and of K x M, each of which
may set ``rpm`` (GCRA), ``tpm`` and ``usd`` (token buckets with reservation) and ``max_parallel``
(leases with a TTL). ``Limits.admit`` decides all of them at once, in this order of tiers:

    Redis configured ──▶ RedisLimits.admit (one script, every scope; ~10 ms timeout, a breaker)
        │ Unavailable
        └──▶ per scope, its on_redis_failure:
               local  ── MemoryTier with limit / live replicas, from where Redis last left it
               open   ── not checked
               closed ── refused (429, retry in 1 s)
    no Redis ─────────▶ MemoryTier, the whole limit in this process

A refused decision becomes ``RateLimited`` (429, ``rate_limit_exceeded``) or, for a spent dollar
budget, ``QuotaExceeded`` (429, ``insufficient_quota``), with the exact wait and the scope and
limit named, and every decision gives its ``x-ratelimit-*`` headers (``gateway.limits_reply``).
Whatever tier admitted a request also settles it (``settle``): surplus back, deficit taken, lease
ended. Deciding and settling raise nothing, and nothing waits longer than the Redis timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.limits_config import EVERY_KEY, LimitSet, LimitsSection
from gateway.limits_memory import Check, MemoryTier, Verdict
from gateway.limits_redis import RedisLimits, Unavailable

log = logging.getLogger("interlock.limits")

ANONYMOUS = "anonymous"
DEFAULT_PREFIX = "interlock:limits:"
#: a ``closed`` scope refuses for this long while Redis is gone
CLOSED_RETRY_S = 1.0


@dataclass(slots=True)
class Decision:
    """How one request's checks went, and where, so that the same tier settles them."""

    checks: list[Check]
    verdicts: list[Verdict]
    admitted: bool
    lease: str
    #: "redis", "memory" (no Redis) or "fallback" (Redis failed: per scope, local/open/closed)
    tier: str
    #: in the fallback: the checks the local tier took from, and the share of the limit it enforced
    local: list[Check] = field(default_factory=list)
    scale: float = 1.0
    settled: bool = False


#: throttled scopes the status page can list at most
MAX_THROTTLED_KEPT = 1000


class Limits:
    """The process's limiter: the memory tier, and Redis when a URL is given."""

    def __init__(
        self,
        redis_url: str | None,
        *,
        timeout_s: float = 0.01,
        heartbeat_s: float = 1.0,
        prefix: str = DEFAULT_PREFIX,
        clock: Callable[[], float] = time.time,
        share: float = 1.0,
    ) -> None:
        if not 0 < share <= 1:
            raise ValueError("share is the part of each limit this process enforces: 0 < share <= 1")
        self.prefix = prefix
        self.heartbeat_s = heartbeat_s
        #: without Redis, the part of every limit this process enforces (1 / N for N worker
        #: processes sharing one host's limits); with Redis the limits are whole in Redis and a
        #: fallback's share comes from the live replicas (each worker is one)
        self.share = share
        self.memory = MemoryTier(clock)
        self.local = MemoryTier(clock)
        self.replica = uuid.uuid4().hex[:16]
        self.redis = (
            RedisLimits(redis_url, prefix=prefix, replica=self.replica, timeout_s=timeout_s)
            if redis_url
            else None
        )
        #: lease id -> the parallel checks it holds in Redis, renewed by each heartbeat
        self._held: dict[str, list[Check]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._beat: asyncio.Task[None] | None = None
        self._used_local = False
        #: scope -> (the limit that refused it, until when: monotonic), for the status page
        self._throttled: dict[str, tuple[str, float]] = {}
        #: (check kind, where it was decided, "admitted" | "refused") -> checks, for /metrics
        #: (``gateway.limits_metrics``); where: memory, redis, or in an outage the scope's
        #: on_redis_failure (local, open, closed)
        self.decisions: defaultdict[tuple[str, str, str], int] = defaultdict(int)

    # -- life -----------------------------------------------------------------------------------

    async def start(self) -> None:
        if self.redis is not None:
            await self.redis.start()
            self._beat = asyncio.create_task(self._heartbeats())

    async def close(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beat
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.redis is not None:
            await self.redis.close()

    def status(self) -> str:
        return "memory" if self.redis is None else self.redis.tier.status()

    def tier(self) -> str:
        """Which tier decides now: memory (no Redis), redis, or fallback (Redis not answering)."""
        if self.redis is None:
            return "memory"
        return "redis" if self.redis.tier.up else "fallback"

    def note_refused(self, decision: Decision) -> None:
        """Remember the scopes this refused decision names, until they would pass again."""
        now = time.monotonic()
        for check, verdict in zip(decision.checks, decision.verdicts, strict=True):
            if not verdict.ok:
                self._throttled[check.scope] = (check.kind, now + verdict.retry_s)
        if len(self._throttled) > MAX_THROTTLED_KEPT:  # bounded whatever the traffic: oldest out
            latest = sorted(self._throttled.items(), key=lambda kv: kv[1][1])[-MAX_THROTTLED_KEPT:]
            self._throttled = dict(latest)

    def throttled(self) -> list[tuple[str, str, float]]:
        """(scope, limit kind, seconds until it passes) for every scope refused and still waiting."""
        now = time.monotonic()
        self._throttled = {scope: seen for scope, seen in self._throttled.items() if seen[1] > now}
        return sorted((scope, kind, until - now) for scope, (kind, until) in self._throttled.items())

    async def _heartbeats(self) -> None:
        assert self.redis is not None
        while True:
            held = [(check, lease) for lease, checks in self._held.items() for check in checks]
            try:
                await self.redis.heartbeat(held, silent_after_s=max(3.0, 3 * self.heartbeat_s))
            except Unavailable:
                pass
            await asyncio.sleep(self.heartbeat_s)

    # -- planning -------------------------------------------------------------------------------

    def plan(
        self,
        section: LimitsSection,
        key: str | None,
        model: str,
        tokens: int,
        usd: float,
        lease_ttl_s: float,
    ) -> list[Check]:
        """The checks a request of ``key`` (None: no keys configured) for ``model`` faces, reserving
        ``tokens`` (prompt estimate + max_tokens) and ``usd``."""
        tenant = key or ANONYMOUS
        block = section.keys.get(tenant) or section.keys.get(EVERY_KEY)
        if block is None:
            return []
        base = f"{self.prefix}{{{tenant}}}"  # the tenant's hash tag: one Cluster slot per tenant
        checks = _checks(block, f"{base}:k", f"key {tenant}", tokens, usd, lease_ttl_s)
        per_model = block.models.get(model)
        if per_model is not None:
            checks += _checks(
                per_model, f"{base}:m:{model}", f"key {tenant}, model {model}", tokens, usd, lease_ttl_s
            )
        return checks

    # -- deciding -------------------------------------------------------------------------------

    async def admit(self, checks: list[Check]) -> Decision:
        lease = uuid.uuid4().hex
        if self.redis is None:
            ok, verdicts = self.memory.admit(checks, lease, self.share)
            self._count(checks, verdicts, "memory")
            return Decision(checks, verdicts, ok, lease, "memory", scale=self.share)
        try:
            ok, verdicts = await self.redis.admit(checks, lease)
        except Unavailable:
            return self._fallback(checks, lease)
        self._count(checks, verdicts, "redis")
        if self._used_local:  # Redis is back: a later outage starts from what it says then
            self._used_local = False
            self.local.forget()
        seeds = self.local.seeds
        for check, verdict in zip(checks, verdicts, strict=True):
            if check.kind != "parallel":
                seeds[check.key] = verdict.remaining / (check.burst if check.kind == "rpm" else check.limit)
        parallel = [c for c in checks if c.kind == "parallel"]
        if ok and parallel:
            self._held[lease] = parallel
        return Decision(checks, verdicts, ok, lease, "redis")

    def _count(self, checks: list[Check], verdicts: list[Verdict], where: str) -> None:
        decisions = self.decisions
        for check, verdict in zip(checks, verdicts, strict=True):
            decisions[check.kind, where, "admitted" if verdict.ok else "refused"] += 1

    def _fallback(self, checks: list[Check], lease: str) -> Decision:
        assert self.redis is not None
        if not self._used_local:
            self._used_local = True
            # this replica's requests admitted by Redis and still running hold their slots here
            # too, or an outage would let each replica run its share on top of them
            for held, parallel in self._held.items():
                for check in parallel:
                    self.local.hold(check, held)
        scale = 1.0 / max(1, self.redis.replicas)
        local = [c for c in checks if c.on_failure == "local"]
        ok, local_verdicts = self.local.admit(local, lease, scale)
        by_check = dict(zip(local, local_verdicts, strict=True))
        verdicts: list[Verdict] = []
        for check in checks:
            if check.on_failure == "closed":
                verdicts.append(Verdict(False, 0, CLOSED_RETRY_S, CLOSED_RETRY_S))
                ok = False
            elif check.on_failure == "open":
                verdicts.append(Verdict(True, check.limit, 0.0, 0.0))
            else:
                verdicts.append(by_check[check])
        for check, verdict in zip(checks, verdicts, strict=True):
            self.decisions[check.kind, check.on_failure, "admitted" if verdict.ok else "refused"] += 1
        return Decision(checks, verdicts, ok, lease, "fallback", local=local if ok else [], scale=scale)

    # -- settling -------------------------------------------------------------------------------

    def settle_soon(self, decision: Decision, tokens: float | None, usd: float | None) -> None:
        """``settle`` without waiting: the request path's (a reply, a stream's end, a client that
        left). On a plain Redis the steps are queued to ride with the next admission."""
        steps = self._finish(decision, tokens, usd)
        if not steps:
            return
        assert self.redis is not None
        if self.redis.queue_settle(steps, decision.lease):
            return
        task = asyncio.get_running_loop().create_task(self._settle_redis(steps, decision.lease))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settle(self, decision: Decision, tokens: float | None, usd: float | None) -> None:
        """The request is over, having used ``tokens`` and ``usd`` (None: nothing: refund it all).
        Exactly once; only an admitted decision holds anything. Applied when it returns."""
        steps = self._finish(decision, tokens, usd)
        if steps:
            await self._settle_redis(steps, decision.lease)

    def _finish(
        self, decision: Decision, tokens: float | None, usd: float | None
    ) -> list[tuple[Check, float | None]]:
        """Settle ``decision`` in memory where a memory tier admitted it; the steps for Redis."""
        if decision.settled or not decision.admitted:
            return []
        decision.settled = True
        self._held.pop(decision.lease, None)
        steps: list[tuple[Check, float | None]] = []
        for check in decision.checks:
            if check.kind == "parallel":
                steps.append((check, None))
            elif check.kind == "tpm":
                steps.append((check, check.cost - (tokens or 0.0)))
            elif check.kind == "usd":
                steps.append((check, check.cost - (usd or 0.0)))
        steps = [(c, d) for c, d in steps if d is None or abs(d) > 1e-12]
        if decision.tier == "memory":
            self._settle_memory(self.memory, steps, decision.lease, decision.scale)
            return []
        if decision.tier == "fallback":
            local = set(decision.local)
            self._settle_memory(
                self.local, [s for s in steps if s[0] in local], decision.lease, decision.scale
            )
            return []
        if self._used_local:  # an outage adopted its slots (``_fallback``): free them there too
            for check, delta in steps:
                if delta is None:
                    self.local.release(check, decision.lease)
        return steps if self.redis is not None else []

    async def _settle_redis(self, steps: list[tuple[Check, float | None]], lease: str) -> None:
        assert self.redis is not None
        try:
            await self.redis.settle(steps, lease)
        except Unavailable:
            # a refund lost errs on the safe side; the lease expires with its TTL
            log.debug("limits: could not settle %s in redis", lease)

    @staticmethod
    def _settle_memory(
        tier: MemoryTier, steps: list[tuple[Check, float | None]], lease: str, scale: float
    ) -> None:
        for check, delta in steps:
            if delta is None:
                tier.release(check, lease)
            else:
                tier.settle(check, delta, scale)


def _checks(
    block: LimitSet, base: str, scope: str, tokens: int, usd: float, lease_ttl_s: float
) -> list[Check]:
    on = block.on_redis_failure
    out: list[Check] = []
    if block.rpm is not None:
        out.append(
            Check("rpm", f"{base}:rpm", scope, block.rpm, 60.0, float(block.burst or block.rpm), 1.0, on)
        )
    if block.tpm is not None:
        out.append(Check("tpm", f"{base}:tpm", scope, block.tpm, 60.0, 1.0, float(tokens), on))
    if block.usd is not None:
        out.append(Check("usd", f"{base}:usd", scope, block.usd.amount, block.usd.period, 1.0, usd, on))
    if block.max_parallel is not None:
        out.append(Check("parallel", f"{base}:par", scope, block.max_parallel, lease_ttl_s, 1.0, 1.0, on))
    return out
