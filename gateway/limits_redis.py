"""Limits kept in Redis, shared by every replica: one Lua script per admission.

``ADMIT`` checks every scope of a request and, only if all pass, takes from each: one round trip,
atomic, on Redis's own clock (``TIME``), so replicas with skewed clocks agree. Settling gives a
reservation's surplus back (or takes its deficit), ends or renews leases; on a plain Redis the
steps of the requests that ended since ride in the next ``ADMIT`` (``RedisLimits``), else they go
as a ``SETTLE`` of their own. Every key a script names on a Redis Cluster belongs to one tenant
and carries its hash tag (``{team-a}``), so both run there without a CROSSSLOT error. The sums
are ``gateway.limits_memory``'s, in milliseconds. https://redis.io/docs/latest/develop/interact/programmability/eval-intro/

Each replica also beats (``heartbeat``): its id into a sorted set by Redis time, the stale ones
out, and the count back, which is how many replicas share a limit when Redis goes away; the
same beat renews the ``max_parallel`` leases of its requests still in flight, so the leases of a
replica that died expire within their TTL.

Redis sits behind ``gateway.cache_store.RedisTier``: a timeout of about 10 ms per call and a
breaker; a failure raises ``Unavailable`` and the caller applies each scope's ``on_redis_failure``.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import defaultdict
from typing import Any

from gateway.cache_store import RedisTier, Unavailable
from gateway.limits_memory import Check, Verdict
from gateway.limits_wire import WireClient

__all__ = ["ADMIT", "SETTLE", "RedisLimits", "Unavailable"]

#: one settlement step (kind, a, b, c) on ``key`` at ``now``: b = give back (capacity, refill per
#: ms, delta: negative takes a deficit), x = end lease (-, -, lease id), r = renew lease (ttl ms,
#: -, id)
_SETTLE_STEP = """
local function settle(key, kind, a, b, c, now)
  if kind == 'b' then
    local h = redis.call('HMGET', key, 'l', 't')
    local level = a
    if h[1] then level = math.min(a, tonumber(h[1]) + math.max(0, now - tonumber(h[2])) * b) end
    level = math.min(a, level + tonumber(c))
    redis.call('HSET', key, 'l', tostring(level), 't', tostring(now))
    redis.call('PEXPIRE', key, math.ceil((a - level) / b) + 1000)
  elseif kind == 'x' then
    redis.call('ZREM', key, c)
  else
    if redis.call('ZADD', key, 'XX', 'CH', now + a, c) == 1 then
      redis.call('PEXPIRE', key, math.ceil(a * 2))
    end
  end
end
"""

#: ARGV[1]: n, the settlement steps first (other requests' endings, riding with this one);
#: KEYS: the n steps' keys, then one per check; ARGV after the first: four per key, a step's as
#: in ``_SETTLE_STEP``, then a check's (kind, a, b, c): g = GCRA (interval ms, burst, -),
#: b = bucket (capacity, refill per ms, cost), p = leases (limit, ttl ms, lease id).
#: Returns {admitted, then per check: ok, remaining, reset ms, retry ms}, numbers as strings
#: (a Lua number returned to Redis is cut to an integer).
ADMIT = (
    """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
"""
    + _SETTLE_STEP
    + """
local n = tonumber(ARGV[1])
for i = 1, n do
  local at = 1 + (i - 1) * 4
  settle(KEYS[i], ARGV[at + 1], tonumber(ARGV[at + 2]), tonumber(ARGV[at + 3]), ARGV[at + 4], now)
end
local out = {}
local all = 1
local new = {}
for i = n + 1, #KEYS do
  local key = KEYS[i]
  local at = 1 + (i - 1) * 4
  local kind, a, b, c = ARGV[at + 1], tonumber(ARGV[at + 2]), tonumber(ARGV[at + 3]), ARGV[at + 4]
  local ok, remaining, reset, retry = 1, 0, 0, 0
  if kind == 'g' then
    local tat = tonumber(redis.call('GET', key) or '0')
    if tat < now then tat = now end
    local nt = tat + a
    local allow_at = nt - b * a
    if allow_at > now + 0.000001 then
      ok, reset, retry = 0, tat - now, allow_at - now
      remaining = math.floor((now + b * a - tat) / a + 0.000001)
    else
      remaining, reset = math.floor((now + b * a - nt) / a + 0.000001), nt - now
      new[i] = nt
    end
  elseif kind == 'b' then
    local cost = tonumber(c)
    local need = math.max(cost, 1e-9)
    local h = redis.call('HMGET', key, 'l', 't')
    local level = a
    if h[1] then level = math.min(a, tonumber(h[1]) + math.max(0, now - tonumber(h[2])) * b) end
    if cost > a then
      ok, retry = 0, a / b
    elseif level < need then
      ok, retry = 0, (need - level) / b
    else
      level = level - cost
      new[i] = level
    end
    remaining, reset = math.max(0, level), (a - level) / b
  else
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    local n = redis.call('ZCARD', key)
    if n >= a then
      local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
      ok, reset = 0, tonumber(first[2]) - now
      retry = math.min(1000, reset)
    else
      remaining = a - n - 1
      new[i] = c
    end
  end
  if ok == 0 then all = 0 end
  out[#out + 1] = tostring(ok)
  out[#out + 1] = tostring(remaining)
  out[#out + 1] = tostring(reset)
  out[#out + 1] = tostring(retry)
end
if all == 1 then
  for i = n + 1, #KEYS do
    local key = KEYS[i]
    local at = 1 + (i - 1) * 4
    local kind, a, b = ARGV[at + 1], tonumber(ARGV[at + 2]), tonumber(ARGV[at + 3])
    if kind == 'g' then
      redis.call('SET', key, tostring(new[i]), 'PX', math.ceil(new[i] - now) + 1000)
    elseif kind == 'b' then
      redis.call('HSET', key, 'l', tostring(new[i]), 't', tostring(now))
      redis.call('PEXPIRE', key, math.ceil((a - new[i]) / b) + 1000)
    else
      redis.call('ZADD', key, now + b, new[i])
      redis.call('PEXPIRE', key, math.ceil(b * 2))
    end
  end
end
table.insert(out, 1, tostring(all))
return out
"""
)

#: KEYS: one per step; ARGV: four per step, as in ``_SETTLE_STEP``
SETTLE = (
    """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
"""
    + _SETTLE_STEP
    + """
for i, key in ipairs(KEYS) do
  local at = (i - 1) * 4
  settle(key, ARGV[at + 1], tonumber(ARGV[at + 2]), tonumber(ARGV[at + 3]), ARGV[at + 4], now)
end
return 1
"""
)

#: KEYS[1]: the replicas' sorted set; ARGV: replica id, how long a silent one still counts (ms)
HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) * 2))
return redis.call('ZCARD', KEYS[1])
"""

_SHA = {script: hashlib.sha1(script.encode()).hexdigest() for script in (ADMIT, SETTLE, HEARTBEAT)}


def _args(check: Check, lease: str) -> list[Any]:
    if check.kind == "rpm":
        return ["g", check.period_s * 1000 / check.limit, check.burst, ""]
    if check.kind == "parallel":
        return ["p", check.limit, check.period_s * 1000, lease]
    return ["b", check.limit, check.limit / (check.period_s * 1000), repr(float(check.cost))]


#: settlements wait at most this long for an admission to ride with (else they go alone)
SETTLE_DELAY_S = 0.002
#: settlement steps at most in one script (a burst of endings is cut into several)
SETTLE_BATCH = 256


class RedisLimits:
    """The shared tier: ``admit``, ``settle``, ``heartbeat``; each raises only ``Unavailable``.

    On a plain Redis (not Cluster) the calls go through ``gateway.limits_wire`` and settling is
    queued (``queue_settle``): every step queued since the last admission rides in the next
    one's ``ADMIT`` script (applied before its checks, so that a lease ended or a refund is seen
    by it), or goes alone as one ``SETTLE`` after ``SETTLE_DELAY_S``: one script and one round
    trip per request, not two, and nothing on the request path waits for a settlement. (On a
    Cluster the steps of many tenants cannot share a script: each settles on its own.)
    """

    def __init__(
        self, url: str, *, prefix: str, replica: str, timeout_s: float, settle_delay_s: float = SETTLE_DELAY_S
    ) -> None:
        self.tier = RedisTier(url, timeout_s=timeout_s)
        self.prefix = prefix
        self.replica = replica
        self.settle_delay_s = settle_delay_s
        #: replicas alive at the last heartbeat that got through (this one included)
        self.replicas = 1
        self.wire = (
            None
            if self.tier.cluster
            else WireClient.for_url(
                url, connect_timeout_s=self.tier.connect_timeout_s, scripts=(ADMIT, SETTLE, HEARTBEAT)
            )
        )
        if self.wire is not None:
            self.tier.client = self.wire  # RedisTier asks its client only for ping() and aclose()
        #: settlement steps queued (the wire only): keys, and four arguments per key
        self._keys: list[str] = []
        self._args: list[Any] = []
        self._timer: asyncio.TimerHandle | None = None
        #: settlement steps known lost: Redis was not connected or the call failed (refunds that
        #: never came back, slots held until their lease's TTL)
        self.settles_lost = 0

    async def start(self) -> None:
        await self.tier.start()

    async def close(self) -> None:
        try:
            await self.flush()
        except Unavailable:
            pass
        await self.tier.close()

    async def admit(self, checks: list[Check], lease: str) -> tuple[bool, list[Verdict]]:
        keys = [c.key for c in checks]
        args: list[Any] = []
        for check in checks:
            args += _args(check, lease)
        if self.wire is not None:

            async def run(client: WireClient) -> Any:
                await client.connect()
                # taken only now, connected: a call refused before it is sent keeps them queued
                steps, settle_args = self._take_steps()
                command = (
                    b"EVALSHA", _SHA[ADMIT], len(steps) + len(keys), *steps, *keys,
                    len(steps), *settle_args, *args,
                )  # fmt: skip
                future = client.send([command], reply=True)
                assert future is not None
                return await future

            reply = await self.tier._call(run)
        else:
            reply = await self._eval(ADMIT, keys, [0, *args])
        verdicts = [
            Verdict(
                reply[i] in (b"1", "1"),
                float(reply[i + 1]),
                float(reply[i + 2]) / 1000,
                float(reply[i + 3]) / 1000,
            )
            for i in range(1, len(reply), 4)
        ]
        return reply[0] in (b"1", "1"), verdicts

    async def settle(self, steps: list[tuple[Check, float | None]], lease: str) -> None:
        """Per check: a bucket's delta (refund > 0), or None to end this request's lease; done
        when it returns."""
        if self.queue_settle(steps, lease):
            await self.flush()
            return
        keys: list[str] = []
        args: list[Any] = []
        for check, delta in steps:
            keys.append(check.key)
            args += _settle_args(check, delta, lease)
        if keys:
            try:
                await self._eval(SETTLE, keys, args)
            except Unavailable:
                self.settles_lost += len(keys)
                raise

    def queue_settle(self, steps: list[tuple[Check, float | None]], lease: str) -> bool:
        """Queue ``steps`` to go with the next write (False, nothing queued: not on the wire)."""
        if self.wire is None:
            return False
        for check, delta in steps:
            self._keys.append(check.key)
            self._args += _settle_args(check, delta, lease)
        if len(self._keys) >= SETTLE_BATCH:
            self._send_settles()
        elif self._timer is None and self._keys:
            self._timer = asyncio.get_running_loop().call_later(self.settle_delay_s, self._send_settles)
        return True

    async def flush(self) -> None:
        """Send the queued settlements now and wait for Redis to have applied them."""
        if self.wire is None or not self._keys:
            return

        async def run(client: WireClient) -> Any:
            await client.connect()
            commands = self._take_settles()
            return await client.call(*commands) if commands else None

        await self.tier._call(run)

    def _take_steps(self) -> tuple[list[str], list[Any]]:
        """The queued settlement steps (keys, arguments), no longer queued."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        keys, args = self._keys, self._args
        self._keys, self._args = [], []
        return keys, args

    def _take_settles(self) -> list[tuple[Any, ...]]:
        keys, args = self._take_steps()
        return [(b"EVALSHA", _SHA[SETTLE], len(keys), *keys, *args)] if keys else []

    def _send_settles(self) -> None:
        self._timer = None
        assert self.wire is not None
        if not self.wire.connected:  # an outage: lost, as a failed call's would be
            self.settles_lost += len(self._keys)
            self._keys, self._args = [], []
            return
        self.wire.send(self._take_settles())

    async def heartbeat(self, held: list[tuple[Check, str]], silent_after_s: float) -> int:
        """Say this replica lives, renew the leases it holds; returns the live replicas."""
        count = await self._eval(
            HEARTBEAT, [f"{self.prefix}replicas"], [self.replica, int(silent_after_s * 1000)]
        )
        self.replicas = max(1, int(count))
        by_tenant: dict[str, list[tuple[Check, str]]] = defaultdict(list)
        for check, lease in held:
            by_tenant[check.key.split("}", 1)[0]].append((check, lease))
        for leases in by_tenant.values():  # one script per hash tag: never a cross-slot call
            keys = [check.key for check, _ in leases]
            args: list[Any] = []
            for check, lease in leases:
                args += ["r", check.period_s * 1000, 0, lease]
            await self._eval(SETTLE, keys, args)
        return self.replicas

    async def _eval(self, script: str, keys: list[str], args: list[Any]) -> Any:
        sha = _SHA[script]
        if self.wire is not None:  # a NOSCRIPT is answered by the wire itself
            command = (b"EVALSHA", sha, len(keys), *keys, *args)
            return await self.tier._call(lambda client: client.call(command))

        from redis.exceptions import NoScriptError

        async def run(client: Any) -> Any:
            try:
                return await client.evalsha(sha, len(keys), *keys, *args)
            except NoScriptError:  # a fresh or restarted server: the first call sends the text
                return await client.eval(script, len(keys), *keys, *args)

        return await self.tier._call(run)


def _settle_args(check: Check, delta: float | None, lease: str) -> list[Any]:
    if delta is None:
        return ["x", 0, 0, lease]
    return ["b", check.limit, check.limit / (check.period_s * 1000), repr(float(delta))]
