"""The limits' own Redis connection (``gateway.limits_wire``) against a private redis-server: one
round trip per request (settlements ride with the next admission), replies matched to their
callers through a timeout, scripts sent again after a flush, a password and a database; and
``max_parallel`` in an outage counting the requests Redis admitted before it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from gateway.limits import Limits
from gateway.limits_config import LimitsSection
from gateway.limits_metrics import limit_families
from tests.redis_servers import REDIS_SERVER, RedisServer

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    s = RedisServer(tmp_path).start()
    try:
        yield s
    finally:
        s.stop()


def section(limits: dict[str, object]) -> LimitsSection:
    return LimitsSection.model_validate({"keys": {"*": limits}})


def scripts_run(port: int) -> int:
    stats = redis.Redis(port=port).info("commandstats")
    return sum(stats.get(name, {}).get("calls", 0) for name in ("cmdstat_evalsha", "cmdstat_eval"))


def test_settlements_ride_with_the_next_admission(server: RedisServer) -> None:
    cfg = section({"rpm": 100_000, "tpm": 1_000_000, "max_parallel": 5})

    async def main() -> None:
        limits = Limits(server.url, timeout_s=1.0, heartbeat_s=60)
        await limits.start()
        assert limits.redis is not None and limits.redis.wire is not None
        try:
            await limits.admit(limits.plan(cfg, "t", "chat", 10, 0.0, 30))  # connected, scripts loaded
            before = scripts_run(server.port)
            for _ in range(50):
                decision = await limits.admit(limits.plan(cfg, "t", "chat", 1000, 0.0, 30))
                assert decision.tier == "redis" and decision.admitted
                limits.settle_soon(decision, 10, None)  # used 10 of the 1000 reserved
            await limits.redis.flush()
            # 50 admissions, each carrying the settlement before it in its script, then the last
            assert scripts_run(server.port) - before == 50 + 1
            assert limits.redis.tier.errors == 0, limits.redis.tier.last_error
            r = redis.Redis(port=server.port)
            parallel = [k for k in r.keys("*") if k.endswith(b":par")]
            assert parallel and all(r.zcard(k) <= 1 for k in parallel)  # the first one's lease only
            decision = await limits.admit(limits.plan(cfg, "t", "chat", 0, 0.0, 30))
            tpm = next(v for c, v in zip(decision.checks, decision.verdicts, strict=True) if c.kind == "tpm")
            # every surplus came back: 51 requests took 10 each (the first reserved 10), no more
            assert tpm.remaining >= 1_000_000 - 51 * 10 - 1
        finally:
            await limits.close()

    asyncio.run(main())
    # Redis ran about one script per request, not two
    stats = redis.Redis(port=server.port).info("commandstats")
    assert stats["cmdstat_evalsha"]["failed_calls"] == 0


def test_a_reply_after_its_caller_gave_up_goes_to_no_one_else(server: RedisServer) -> None:
    async def main() -> None:
        limits = Limits(server.url, timeout_s=0.05, heartbeat_s=60)
        await limits.start()
        try:
            rpm = section({"rpm": 1000})
            assert (await limits.admit(limits.plan(rpm, "a", "chat", 1, 0.0, 30))).tier == "redis"
            pauser = redis.asyncio.Redis(port=server.port)
            await pauser.client_pause(300)
            await pauser.aclose()
            assert (await limits.admit(limits.plan(rpm, "a", "chat", 1, 0.0, 30))).tier == "fallback"
            # once Redis answers again, each caller gets its own reply: its tenant's fresh tpm
            # bucket (a call that timed out still ran: hence a new tenant each time), not the rpm
            # verdict of the call that gave up before it
            tpm = section({"tpm": 5000})
            deadline = time.monotonic() + 20
            for i in range(10**6):
                decision = await limits.admit(limits.plan(tpm, f"b{i}", "chat", 100, 0.0, 30))
                if decision.tier == "redis":
                    break
                assert time.monotonic() < deadline, "redis never came back"
                await asyncio.sleep(0.05)
            assert decision.admitted and decision.verdicts[0].remaining == pytest.approx(4900, abs=1)
        finally:
            await limits.close()

    asyncio.run(main())


def test_a_script_flush_or_a_restart_costs_no_refusal(server: RedisServer) -> None:
    cfg = section({"rpm": 1000})

    async def main() -> None:
        limits = Limits(server.url, timeout_s=1.0, heartbeat_s=60)
        await limits.start()
        assert limits.redis is not None
        try:
            assert (await limits.admit(limits.plan(cfg, "t", "chat", 1, 0.0, 30))).tier == "redis"
            redis.Redis(port=server.port).script_flush()
            decision = await limits.admit(limits.plan(cfg, "t", "chat", 1, 0.0, 30))
            assert decision.tier == "redis" and decision.admitted  # NOSCRIPT answered with the text
            server.stop()
            assert (await limits.admit(limits.plan(cfg, "t", "chat", 1, 0.0, 30))).tier == "fallback"
            server.start()  # same port, no scripts loaded
            deadline = time.monotonic() + 30
            while (await limits.admit(limits.plan(cfg, "t", "chat", 1, 0.0, 30))).tier != "redis":
                assert time.monotonic() < deadline, "never reconnected"
                await asyncio.sleep(0.1)
        finally:
            await limits.close()

    asyncio.run(main())


def test_a_password_and_a_database(server: RedisServer) -> None:
    redis.Redis(port=server.port).config_set("requirepass", "s3cret")
    cfg = section({"rpm": 1000})

    async def main(url: str) -> str:
        limits = Limits(url, timeout_s=1.0, heartbeat_s=60)
        await limits.start()
        try:
            return (await limits.admit(limits.plan(cfg, "t", "chat", 1, 0.0, 30))).tier
        finally:
            await limits.close()

    assert asyncio.run(main(f"redis://:s3cret@127.0.0.1:{server.port}/3")) == "redis"
    r = redis.Redis(port=server.port, password="s3cret", db=3)
    assert any(k.endswith(b":rpm") for k in r.keys("*"))
    assert asyncio.run(main(f"redis://:wrong@127.0.0.1:{server.port}/3")) == "fallback"


def test_an_outage_counts_the_slots_redis_gave_before_it(server: RedisServer) -> None:
    cfg = section({"max_parallel": 6, "on_redis_failure": "local"})

    async def main() -> None:
        limits = Limits(server.url, timeout_s=0.2, heartbeat_s=60)
        await limits.start()
        assert limits.redis is not None
        try:
            running = [await limits.admit(limits.plan(cfg, "t", "chat", 1, 0.0, 30)) for _ in range(2)]
            assert all(d.tier == "redis" and d.admitted for d in running)
            limits.redis.replicas = 3  # as the heartbeats said: this replica's share is 2
            server.stop()
            # both slots of the share are taken by requests Redis admitted, still running
            refused = await limits.admit(limits.plan(cfg, "t", "chat", 1, 0.0, 30))
            assert refused.tier == "fallback" and not refused.admitted
            await limits.settle(running[0], 1, None)
            admitted = await limits.admit(limits.plan(cfg, "t", "chat", 1, 0.0, 30))
            assert admitted.tier == "fallback" and admitted.admitted
            assert not (await limits.admit(limits.plan(cfg, "t", "chat", 1, 0.0, 30))).admitted
            counts = dict(limits.decisions)
            assert counts[("parallel", "redis", "admitted")] == 2
            assert counts[("parallel", "local", "refused")] == 2
            assert counts[("parallel", "local", "admitted")] == 1
            assert limits.tier() == "fallback"
            # the release of running[0]'s Redis slot could not be sent: counted, for /metrics
            for _ in range(2000):  # the settle delay's timer drops it: 20 s on a loaded machine
                if limits.redis.settles_lost:
                    break
                await asyncio.sleep(0.01)
            assert limits.redis.settles_lost >= 1
            lost = [m for m in limit_families(limits) if m.name == "interlock_limit_settlements_lost"]
            assert lost[0].samples[0].value == limits.redis.settles_lost
        finally:
            await limits.close()

    asyncio.run(main())
