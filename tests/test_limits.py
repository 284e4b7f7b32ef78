"""Per-key limits without sockets: the arithmetic on an injected clock, the config's errors, the
headers and refusals, and the stream that settles and strips the usage chunk."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from backends.base import Usage
from gateway.config import ConfigError, parse_config
from gateway.errors import QuotaExceeded, RateLimited, error_headers
from gateway.limits import Limits
from gateway.limits_config import LimitsSection
from gateway.limits_memory import Check, MemoryTier, gcra, take
from gateway.limits_reply import duration, rate_headers, refusal
from tests.fakes import Clock


def rpm(limit: int, burst: int | None = None, key: str = "k") -> Check:
    return Check("rpm", key, "key t", limit, 60.0, float(burst or limit))


def test_gcra_admits_the_burst_then_exactly_one_per_interval() -> None:
    clock = Clock(0.0)
    tier = MemoryTier(clock)
    check = rpm(60, burst=10)  # one per second, 10 at once
    results = [tier.admit([check], "l")[0] for _ in range(11)]
    assert results == [True] * 10 + [False]
    ok, (verdict,) = tier.admit([check], "l")
    assert not ok and verdict.retry_s == pytest.approx(1.0)  # exactly when the next one passes
    clock.advance(0.999)
    assert not tier.admit([check], "l")[0]
    clock.advance(0.001)
    assert tier.admit([check], "l")[0]
    assert not tier.admit([check], "l")[0]


def test_gcra_has_no_window_edge_burst() -> None:
    """A fixed window would admit 2x the limit across its edge; GCRA admits limit + elapsed pace."""
    clock = Clock(59.9)
    tier = MemoryTier(clock)
    check = rpm(30)
    admitted = 0
    for _ in range(200):  # 59.9 s .. 60.1 s, straddling any minute boundary
        admitted += tier.admit([check], "l")[0]
        clock.advance(0.001)
    assert admitted == 30


def test_gcra_remaining_and_reset() -> None:
    _, tat, verdict = gcra(0.0, 100.0, 2.0, 5.0)
    assert verdict.ok and verdict.remaining == 4 and verdict.reset_s == pytest.approx(2.0)
    assert tat == pytest.approx(102.0)


def test_bucket_reserves_refunds_and_charges_deficits() -> None:
    clock = Clock(0.0)
    tier = MemoryTier(clock)
    check = Check("tpm", "t", "key t", 600, 60.0, 1.0, cost=500)
    assert tier.admit([check], "a")[0]
    assert not tier.admit([check], "b")[0]  # 100 left
    tier.settle(check, 500 - 120)  # it used 120: 380 back, 480 left
    ok, (verdict,) = tier.admit([check], "c")
    assert not ok and verdict.retry_s == pytest.approx(2.0)  # 20 more at 10 a second
    clock.advance(2.0)
    assert tier.admit([check], "c")[0]
    tier.settle(check, 500 - 700)  # it used 700: the 200 over are taken too
    clock.advance(50.0)  # -200 + 500 refilled = 300
    ok, (verdict,) = tier.admit([check], "d")
    assert not ok and verdict.retry_s == pytest.approx(20.0)


def test_bucket_refuses_what_can_never_fit_and_a_spent_one_refuses_even_free_requests() -> None:
    ok, _, verdict = take(100.0, 100.0, 1.0, 101.0)
    assert not ok and verdict.retry_s == pytest.approx(100.0)
    ok, _, _ = take(0.0, 10.0, 1.0, 0.0)
    assert not ok


def test_all_scopes_or_none() -> None:
    tier = MemoryTier(Clock(0.0))
    loose, tight = rpm(100, key="a"), rpm(1, key="b")
    assert tier.admit([loose, tight], "1")[0]
    ok, verdicts = tier.admit([loose, tight], "2")
    assert not ok and verdicts[0].ok and not verdicts[1].ok
    _, (after,) = tier.admit([loose], "3")
    assert after.remaining == 98  # the refused request took nothing from the loose scope


def test_leases_expire_and_free_their_slots() -> None:
    clock = Clock(0.0)
    tier = MemoryTier(clock)
    check = Check("parallel", "p", "key t", 2, 5.0)
    assert tier.admit([check], "a")[0] and tier.admit([check], "b")[0]
    assert not tier.admit([check], "c")[0]
    tier.release(check, "a")
    assert tier.admit([check], "c")[0]
    clock.advance(5.0)  # "b" and "c" were never released: their TTL frees them
    assert tier.admit([check], "d")[0] and tier.admit([check], "e")[0]


def test_local_fallback_starts_from_what_redis_said_and_takes_its_share() -> None:
    tier = MemoryTier(Clock(0.0))
    check = rpm(90)
    tier.seeds["k"] = 30 / 90  # Redis said: 30 of 90 left; 3 replicas share them
    admitted = sum(tier.admit([check], str(i), scale=1 / 3)[0] for i in range(50))
    assert admitted == 10


def test_duration_format() -> None:
    assert duration(0.0201) == "21ms"
    assert duration(1.5) == "1.5s"
    assert duration(360) == "6m0s"
    assert duration(86400) == "24h0m0s"


def section(data: dict[str, object]) -> LimitsSection:
    return LimitsSection.model_validate(data)


def test_plan_and_refusals_name_scope_and_limit() -> None:
    async def main() -> None:
        limits = Limits(None, clock=Clock(0.0))
        limits_cfg = section({"keys": {"*": {"rpm": 1, "usd": {"amount": 1, "period": "1h"}}}})
        checks = limits.plan(limits_cfg, "team", "chat", 10, 0.5, 30)
        assert {c.key for c in checks} == {"interlock:limits:{team}:k:rpm", "interlock:limits:{team}:k:usd"}
        first = await limits.admit(checks)
        assert first.admitted
        headers = dict(rate_headers(first))
        assert headers[b"x-ratelimit-limit-requests"] == b"1"
        assert headers[b"x-ratelimit-remaining-requests"] == b"0"
        assert headers[b"x-ratelimit-reset-requests"] == b"1m0s"
        second = await limits.admit(checks)
        exc = refusal(second)
        assert isinstance(exc, RateLimited) and exc.status == 429 and exc.code == "rate_limit_exceeded"
        assert "key team" in exc.message and "limit 1" in exc.message
        assert error_headers(exc)["retry-after"] == "60"
        big = limits.plan(section({"keys": {"*": {"tpm": 100}}}), "c", "chat", 150, 0.0, 30)
        exc = refusal(await limits.admit(big))
        assert "Request too large" in exc.message and "requested 150" in exc.message and exc.type == "tokens"
        spend = limits.plan(section({"keys": {"*": {"usd": {"amount": 1}}}}), "b", "chat", 10, 0.6, 30)
        assert (await limits.admit(spend)).admitted
        exc = refusal(await limits.admit(spend))
        assert isinstance(exc, QuotaExceeded) and exc.code == "insufficient_quota" and exc.status == 429

    asyncio.run(main())


def test_settle_refunds_surplus() -> None:
    async def main() -> None:
        limits = Limits(None, clock=Clock(0.0))
        cfg = section({"keys": {"*": {"tpm": 1000}}})
        checks = limits.plan(cfg, None, "chat", 800, 0.0, 30)
        decision = await limits.admit(checks)
        assert not (await limits.admit(checks)).admitted
        await limits.settle(decision, 100, None)
        await limits.settle(decision, 0, None)  # exactly once
        assert (await limits.admit(checks)).admitted  # 900 left
        assert not (await limits.admit(limits.plan(cfg, None, "chat", 200, 0.0, 30))).admitted

    asyncio.run(main())


BASE = {
    "backends": {"up": {"kind": "openai", "base_url": "http://127.0.0.1:1/v1", "model": "x"}},
    "models": {"chat": {"targets": ["up"]}},
}
KEY = {"name": "team", "sha256": "a" * 64}


def problems(limits: object, auth: object = None) -> list[tuple[str, str]]:
    data = {**BASE, "limits": limits, **({"auth": auth} if auth else {})}
    with pytest.raises(ConfigError) as info:
        parse_config(data, env={})
    return info.value.problems


def test_config_errors_are_path_precise() -> None:
    found = problems(
        {
            "keys": {
                "team": {"rpm": 0, "usd": {"amount": 5, "period": "soon"}, "on_redis_failure": "maybe"},
                "ghost": {"tpm": 5},
                "*": {"burst": 3, "models": {"nope": {"rpm": 1}, "chat": {"max_parallel": -1}}},
            },
            "route_max_tokens": {"other": 5},
            "bogus": 1,
        },
        auth={"keys": [KEY]},
    )
    paths = {path for path, _ in found}
    assert {
        "limits.keys.team.rpm",
        "limits.keys.team.usd.period",
        "limits.keys.team.on_redis_failure",
        "limits.keys.ghost",
        "limits.keys.*.burst",
        "limits.keys.*.models.nope",
        "limits.keys.*.models.chat.max_parallel",
        "limits.route_max_tokens.other",
        "limits.bogus",
    } <= paths, found
    messages = dict(found)
    assert "unknown client key 'ghost'" in messages["limits.keys.ghost"]
    assert "unknown model 'nope'" in messages["limits.keys.*.models.nope"]


def test_without_keys_only_every_key_applies() -> None:
    (found,) = problems({"keys": {"team": {"rpm": 5}}})
    assert found[0] == "limits.keys.team" and "only '*'" in found[1]
    every = {"*": {"rpm": 5, "usd": {"amount": 2, "period": "1d"}}}
    loaded = parse_config({**BASE, "limits": {"keys": every}})
    assert loaded.limits.keys["*"].usd is not None and loaded.limits.keys["*"].usd.period == 86400


class _Admission:
    prompt_tokens = 7
    strip_usage = True

    def __init__(self) -> None:
        self.settled: list[float] = []

    def settle(self, tokens: float, usd: float | None) -> None:
        self.settled.append(tokens)


class _Target:
    def cost_usd(self, usage: Usage) -> float:
        return 0.0


def test_settling_stream_strips_the_usage_chunk_and_settles_on_it() -> None:
    from gateway.limits_step import SettlingStream

    events = [
        b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n',
        b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\ndata: {"choi',
        b'ces":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}\n\n',
        b"data: [DONE]\n\n",
    ]

    async def chunks() -> AsyncIterator[bytes]:
        for event in events:
            yield event

    async def main() -> tuple[bytes, list[float]]:
        admission = _Admission()
        first = b'data: {"choices":[{"delta":{"role":"assistant"}}]}\n\n'
        stream = SettlingStream(admission, _Target(), first, chunks())  # type: ignore[arg-type]
        out = b"".join([chunk async for chunk in stream])
        return out, admission.settled

    out, settled = asyncio.run(main())
    assert b'"usage"' not in out and out.endswith(b"data: [DONE]\n\n") and b"finish_reason" in out
    assert settled == [7]


def test_leases_must_outlive_heartbeats() -> None:
    (found,) = problems({"lease_ttl_s": 2, "heartbeat_s": 5})
    assert found[0] == "limits" and "twice heartbeat_s" in found[1]


def test_a_share_of_every_limit_without_redis() -> None:
    """N worker processes on one host without Redis: each enforces 1 / N of every limit."""

    async def main() -> None:
        limits = Limits(None, clock=Clock(0.0), share=0.25)
        cfg = section({"keys": {"*": {"tpm": 2000, "max_parallel": 8}}})
        running = [await limits.admit(limits.plan(cfg, None, "chat", 100, 0.0, 30)) for _ in range(20)]
        assert sum(d.admitted for d in running) == 2  # max_parallel: 8 / 4
        for decision in running:
            await limits.settle(decision, 100, None)
        later = 0
        for _ in range(20):
            decision = await limits.admit(limits.plan(cfg, None, "chat", 100, 0.0, 30))
            later += decision.admitted
            await limits.settle(decision, 100, None)
        assert later == 3  # tpm: 2000 / 4 = 5 requests of 100, 2 of them already taken
        rpm = section({"keys": {"*": {"rpm": 40}}})
        got = [await limits.admit(limits.plan(rpm, "x", "chat", 1, 0.0, 30)) for _ in range(20)]
        assert sum(d.admitted for d in got) == 10  # a burst of 40 / 4
        with pytest.raises(ValueError):
            Limits(None, share=0)

    asyncio.run(main())
