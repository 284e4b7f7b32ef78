"""The vLLM pool's routing and failure handling, against simulated vLLM servers on loopback.

The pool is driven directly (no gateway in front), so each test can read which server
served what (``VllmSim.requests``), inject the tie-breaking ``random.Random`` and the DNS
answers, and kill a server in the middle of a burst.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack, asynccontextmanager
from typing import Any

import pytest

from backends.base import BackendRequest, Resources
from backends.errors import BackendUnavailable, InterlockError
from backends.http import HttpClient
from backends.vllm import VllmBackend, VllmConfig
from backends.vllm.affinity import PrefixIndex, block_keys, render_prompt
from tests.fakes import free_port
from tests.vllm_sim import VllmSim

#: long enough for many prefix blocks (256 characters each): ~5,000 characters
SYSTEM = "You are the support assistant of a bicycle shop; answer briefly and politely. " * 64


@pytest.fixture
def sims() -> Iterator[list[VllmSim]]:
    with ExitStack() as stack:
        yield [stack.enter_context(VllmSim()) for _ in range(3)]


@pytest.fixture
async def http() -> AsyncIterator[HttpClient]:
    client = HttpClient()
    await client.start()
    yield client
    await client.close()


def config(urls: list[str] | None = None, **extra: Any) -> VllmConfig:
    fields: dict[str, Any] = {
        "kind": "vllm",
        "model": "smollm2",
        "scrape_interval_s": 0.05,
        "health_interval_s": 0.1,
        "timeouts": {"connect": 1.0, "first_token": 5.0, "total": 10.0},
        **extra,
    }
    if urls is not None:
        fields["endpoints"] = urls
    return VllmConfig.model_validate(fields)


@asynccontextmanager
async def pool(
    http: HttpClient, sims: list[VllmSim], *, seed: int = 1, **extra: Any
) -> AsyncIterator[VllmBackend]:
    backend = VllmBackend(
        "pool", config([s.base_url for s in sims], **extra), Resources(http=http), rng=random.Random(seed)
    )
    await backend.start()
    try:
        yield backend
    finally:
        await backend.close()


def chat(
    user: str,
    *,
    system: str | None = None,
    max_tokens: int = 4,
    session: str | None = None,
    stream: bool = False,
) -> BackendRequest:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": user})
    body: dict[str, Any] = {"model": "chat", "messages": messages, "max_tokens": max_tokens}
    if stream:
        body["stream"] = True
    return BackendRequest("chat", body, f"req-{user[:20]}", stream=stream, session=session)


def served(sims: list[VllmSim]) -> list[int]:
    return [s.served for s in sims]


def index_of(sims: list[VllmSim], url: str | None) -> int:
    assert url is not None
    return [s.base_url.removesuffix("/v1") for s in sims].index(url)


async def until(condition: Callable[[], bool], within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def drain(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])


# --- the prefix index ---------------------------------------------------------------------------


def test_block_keys_chain_whole_prefixes() -> None:
    text = "".join(chr(65 + i % 26) * 16 for i in range(64))  # 1,024 characters
    keys = block_keys(text, 256)
    assert len(keys) == 4 and len(block_keys(text + "tail", 256)) == 4  # full blocks only
    assert block_keys(text[:600] + "changed", 256)[:2] == keys[:2]
    assert block_keys("x" + text[1:], 256)[1:] != keys[1:], "a key stands for all that precedes it"

    # every message counts, with its role, not the first one only
    def rendered(last: str) -> str:
        return render_prompt(
            "chat", {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": last}]}
        )

    one, two = rendered("a"), rendered("b")
    assert one != two and one.startswith("<|system|>\ns")


def test_the_index_matches_leading_blocks_expires_and_evicts_tails_first() -> None:
    index = PrefixIndex(ttl_s=10, max_blocks=12)
    a = block_keys("a" * 2560, 256)  # 10 blocks
    b = block_keys("b" * 1280, 256)  # 5 blocks
    index.record(a, now=0)
    assert index.match(a, now=1) == 10
    assert index.match(block_keys("a" * 1000 + "c" * 1560, 256), now=1) == 3
    index.record(b, now=2)
    assert len(index) == 12
    assert index.match(b, now=3) == 5
    assert index.match(a, now=3) == 7, "eviction takes a prompt's tail, keeping its prefix"
    assert index.match(b, now=12.5) == 0, "entries expire after the TTL"


# --- prefix affinity ----------------------------------------------------------------------------


async def test_requests_sharing_a_long_system_prompt_land_on_one_endpoint(
    http: HttpClient, sims: list[VllmSim]
) -> None:
    pair = sims[:2]
    async with pool(http, pair) as backend:
        for i in range(8):
            await backend.complete(chat(f"question {i}", system=SYSTEM))
    assert sorted(served(pair)) == [0, 8]
    home = max(pair, key=lambda s: s.served)
    # the simulated server had the prompt cached from the second request on
    assert [r["cached_chars"] > 4000 for r in home.requests] == [False] + [True] * 7


async def test_a_growing_conversation_follows_its_prefix(http: HttpClient, sims: list[VllmSim]) -> None:
    async with pool(http, sims) as backend:
        history: list[dict[str, str]] = [{"role": "system", "content": SYSTEM}]
        for turn in range(5):
            history.append({"role": "user", "content": f"turn {turn}: " + "details " * 40})
            await backend.complete(
                BackendRequest(
                    "chat", {"model": "chat", "messages": list(history), "max_tokens": 4}, f"t{turn}"
                )
            )
            history.append({"role": "assistant", "content": "The most obvious"})
    assert sorted(served(sims)) == [0, 0, 5]


async def test_distinct_prompts_spread_over_the_pool(http: HttpClient, sims: list[VllmSim]) -> None:
    pair = sims[:2]
    async with pool(http, pair) as backend:
        await asyncio.gather(
            *(backend.complete(chat("go", system=f"Persona {i}. " + SYSTEM, max_tokens=16)) for i in range(8))
        )
    assert sorted(served(pair)) == [4, 4]


async def test_the_optional_load_guard_caps_a_busy_affinity_endpoint(
    http: HttpClient, sims: list[VllmSim]
) -> None:
    """Long streams sharing a prompt: four running streams cost less than the cached prompt saves,
    so the cost model keeps them together (a guard too large to matter); a load_guard set below
    their queued tokens spreads them, whatever the model expects."""
    pair = sims[:2]
    for sim in pair:
        sim.decode_s_per_token = 0.005

    async def open_streams(backend: VllmBackend) -> list[int]:
        streams = []
        for i in range(4):
            streams.append(
                await backend.stream(chat(f"story {i}", system=SYSTEM, max_tokens=2000, stream=True))
            )
        loads = [e["in_flight"] for e in backend.endpoints()]
        for chunks in streams:
            await chunks.aclose()  # type: ignore[attr-defined]
        return sorted(loads)

    async with pool(http, pair, load_guard=100_000) as backend:
        assert await open_streams(backend) == [0, 4]
    await until(lambda: all(s.running == 0 for s in pair))  # closing the streams stopped them
    for sim in pair:
        sim.reset()
    async with pool(http, pair, load_guard=1000) as backend:
        assert await open_streams(backend) == [2, 2]


async def test_a_scrape_showing_foreign_load_bypasses_the_affinity_endpoint(
    http: HttpClient, sims: list[VllmSim]
) -> None:
    """Other gateway replicas' requests show up only in /metrics: many waiting there weighs more than
    the cached prefix once past the load guard."""
    pair = sims[:2]
    async with pool(http, pair) as backend:
        await backend.complete(chat("first", system=SYSTEM))
        home = index_of(pair, backend.choose(chat("next", system=SYSTEM)))
        assert pair[home].served == 1
        pair[home].extra_waiting = 12
        await until(lambda: backend.endpoints()[home]["waiting"] == 12)
        assert index_of(pair, backend.choose(chat("next", system=SYSTEM))) == 1 - home
        assert backend.load().queued == 12
        pair[home].extra_waiting = 0
        await until(lambda: backend.endpoints()[home]["waiting"] == 0)
        assert index_of(pair, backend.choose(chat("next", system=SYSTEM))) == home


# --- ties: the session key, else randomness -------------------------------------------------------


async def test_the_session_key_breaks_ties_alike_in_every_replica(
    http: HttpClient, sims: list[VllmSim]
) -> None:
    async with pool(http, sims, seed=1) as one, pool(http, sims, seed=2) as other:
        for n in range(20):
            request = chat("hi", session=f"conversation-{n}")
            picks = {one.choose(request) for _ in range(5)} | {other.choose(request) for _ in range(5)}
            assert len(picks) == 1, "a session must map to one endpoint, in every replica"
        spread = {one.choose(chat("hi", session=f"conversation-{n}")) for n in range(60)}
        assert len(spread) == 3
        for _ in range(6):
            await one.complete(chat("short question", session="conversation-7"))
    assert sorted(served(sims)) == [0, 0, 6]


async def test_ties_are_broken_randomly_per_process(http: HttpClient, sims: list[VllmSim]) -> None:
    async with (
        pool(http, sims, seed=1) as first,
        pool(http, sims, seed=2) as second,
        pool(http, sims, seed=1) as again,
    ):
        request = chat("hi")
        picks = [[b.choose(request) for _ in range(32)] for b in (first, second, again)]
    assert picks[0] != picks[1], "two replicas must not herd onto the same endpoints"
    assert picks[0] == picks[2], "the injected generator decides"
    assert len(set(picks[0])) == 3


# --- DNS ------------------------------------------------------------------------------------------


async def test_dns_answers_add_and_remove_endpoints(
    http: HttpClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    answer: list[str] = ["127.0.0.1"]
    asked: list[tuple[str, int]] = []

    async def getaddrinfo(host: str, port_: int, **_: Any) -> list[tuple[Any, ...]]:
        asked.append((host, port_))
        if not answer:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port_)) for a in answer]

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", getaddrinfo)
    with VllmSim(host="127.0.0.1", port=port) as one, VllmSim(host="127.0.0.2", port=port) as two:
        backend = VllmBackend(
            "pool", config(dns=f"vllm.test:{port}", dns_refresh_s=0.05), Resources(http=http)
        )

        def urls() -> list[str]:
            return sorted(e["url"] for e in backend.endpoints())

        await backend.start()
        try:
            assert asked[0] == ("vllm.test", port)
            assert urls() == [f"http://127.0.0.1:{port}"]
            await backend.complete(chat("hello"))
            assert (one.served, two.served) == (1, 0)

            answer[:] = ["127.0.0.1", "127.0.0.2"]
            await until(lambda: len(urls()) == 2)
            await asyncio.gather(*(backend.complete(chat("go", system=f"{i} " + SYSTEM)) for i in range(4)))
            assert two.served > 0

            answer[:] = []  # a failed lookup keeps the pool as it is
            calls = len(asked)
            await until(lambda: len(asked) > calls + 1)
            assert len(urls()) == 2

            answer[:] = ["127.0.0.2"]
            await until(lambda: urls() == [f"http://127.0.0.2:{port}"])
            before = one.served
            for i in range(3):
                await backend.complete(chat(f"after {i}"))
            assert one.served == before
        finally:
            await backend.close()


# --- failures -------------------------------------------------------------------------------------


async def test_an_endpoint_killed_mid_load_fails_no_request_and_returns_after_revive(
    http: HttpClient, sims: list[VllmSim]
) -> None:
    pair = sims[:2]
    for sim in pair:
        sim.decode_s_per_token = 0.003
    async with pool(http, pair) as backend:

        async def one(i: int) -> bytes:
            reply = await backend.complete(chat(f"question {i}", system=f"{i} " + SYSTEM, max_tokens=40))
            return reply.body

        tasks = [asyncio.create_task(one(i)) for i in range(30)]
        await until(lambda: sum(s.running for s in pair) >= 20)
        victim = max(range(2), key=lambda i: pair[i].running)
        assert pair[victim].running > 0
        killed_at = time.monotonic()
        pair[victim].kill()
        await until(lambda: not backend.endpoints()[victim]["healthy"], within=1.0)
        left_after = time.monotonic() - killed_at
        replies = await asyncio.gather(*tasks)  # raises if any request failed
        assert all(b'"finish_reason":"length"' in body for body in replies)
        assert left_after < 0.5, "a dead endpoint leaves the rotation at once"
        health = await backend.health()
        assert health.ok and backend.endpoints()[victim]["url"] in health.reason

        survivor = pair[1 - victim]
        before = survivor.served
        for i in range(3):
            await backend.complete(chat(f"meanwhile {i}"))
        assert survivor.served == before + 3

        pair[victim].revive()
        await until(lambda: bool(backend.endpoints()[victim]["healthy"]), within=2.0)
        assert (await backend.health()).reason == ""


async def test_a_stream_is_retried_elsewhere_only_before_its_first_byte(
    http: HttpClient, sims: list[VllmSim]
) -> None:
    pair = sims[:2]
    async with pool(http, pair, routing="round_robin", health_interval_s=30) as backend:
        pair[0].kill()  # not yet noticed: the health check is 30 s away
        for i in range(2):  # round robin sends one of these to the dead server first
            body = await drain(await backend.stream(chat(f"s{i}", stream=True)))
            assert body.endswith(b"data: [DONE]\n\n")
        assert pair[1].served == 2
        assert [(e["in_flight"], e["outstanding_tokens"]) for e in backend.endpoints()] == [(0, 0)] * 2

        pair[1].decode_s_per_token = 0.05
        chunks = await backend.stream(chat("long", max_tokens=200, stream=True))
        first = await anext(chunks)
        assert first.startswith(b"data: ")
        pair[1].kill()
        with pytest.raises(InterlockError) as caught:
            await drain(chunks)
        assert caught.value.retryable
        assert pair[1].served == 3, "a stream that had started is not sent anywhere else"
        pair[0].revive()
        pair[1].revive()


async def test_5xx_are_retried_on_another_endpoint_and_eject_after_three(
    http: HttpClient, sims: list[VllmSim]
) -> None:
    pair = sims[:2]
    pair[0].fail_next = 3
    async with pool(http, pair, routing="round_robin", health_interval_s=0.3) as backend:
        for i in range(6):
            reply = await backend.complete(chat(f"q{i}"))
            assert b"chat.completion" in reply.body
        first = backend.endpoints()[0]
        assert first["healthy"] is False
        assert "3 consecutive failures" in first["reason"]
        # its /health passes: the next scheduled check brings it back
        await until(lambda: bool(backend.endpoints()[0]["healthy"]), within=2.0)
        await backend.complete(chat("again"))
        await backend.complete(chat("again"))
        assert pair[0].fail_next == 0 and pair[0].served >= 1


async def test_a_health_check_begun_before_an_ejection_does_not_undo_it(
    http: HttpClient, sims: list[VllmSim]
) -> None:
    pair = sims[:2]
    async with pool(http, pair, routing="round_robin", health_interval_s=60.0) as backend:
        first = next(iter(backend.members))
        pair[0].health_delay_s = 1.0
        # a check is on its way; the server answers it 200, but only after it failed 3 requests
        check = asyncio.create_task(backend.members.check(first, may_restore=True))
        await asyncio.sleep(0.05)
        pair[0].fail_next = 3
        for i in range(6):
            await backend.complete(chat(f"q{i}"))
        assert first.healthy is False
        await check
        assert first.healthy is False, "a 200 from before the ejection put it back"
        # a check begun after the ejection does bring it back
        pair[0].health_delay_s = 0.0
        await backend.members.check(first, may_restore=True)
        assert first.healthy is True


async def test_a_failed_health_check_takes_an_endpoint_out_until_it_passes(
    http: HttpClient, sims: list[VllmSim]
) -> None:
    pair = sims[:2]
    async with pool(http, pair) as backend:
        pair[0].healthy = False
        await until(lambda: backend.endpoints()[0]["healthy"] is False, within=1.0)
        assert backend.endpoints()[0]["reason"] == "GET /health answered 500"
        health = await backend.health()
        assert health.ok and "GET /health answered 500" in health.reason
        for i in range(4):
            await backend.complete(chat(f"q{i}", system=f"{i} " + SYSTEM))
        assert served(pair) == [0, 4]
        pair[0].healthy = True
        await until(lambda: bool(backend.endpoints()[0]["healthy"]), within=1.0)


async def test_no_healthy_endpoint_is_a_retryable_unavailable(http: HttpClient, sims: list[VllmSim]) -> None:
    pair = sims[:2]
    async with pool(http, pair) as backend:
        for sim in pair:
            sim.healthy = False
        await until(lambda: not any(e["healthy"] for e in backend.endpoints()), within=1.0)
        health = await backend.health()
        assert not health.ok and health.reason.startswith("no healthy endpoint")
        with pytest.raises(BackendUnavailable) as caught:
            await backend.complete(chat("hello"))
        assert caught.value.retryable
        with pytest.raises(BackendUnavailable):
            await backend.stream(chat("hello", stream=True))
    assert served(pair) == [0, 0]


# --- the other routing rules ----------------------------------------------------------------------


async def test_round_robin_ignores_prefixes(http: HttpClient, sims: list[VllmSim]) -> None:
    pair = sims[:2]
    async with pool(http, pair, routing="round_robin") as backend:
        order = []
        for i in range(6):
            before = served(pair)
            await backend.complete(chat(f"q{i}", system=SYSTEM))
            order.append([a - b for a, b in zip(served(pair), before, strict=True)].index(1))
    assert order in ([0, 1] * 3, [1, 0] * 3)


async def test_least_in_flight_ignores_prefixes(http: HttpClient, sims: list[VllmSim]) -> None:
    pair = sims[:2]
    for sim in pair:
        sim.decode_s_per_token = 0.01
    async with pool(http, pair, routing="least_in_flight") as backend:
        streams = [
            await backend.stream(chat(f"s{i}", system=SYSTEM, max_tokens=500, stream=True)) for i in range(4)
        ]
        assert sorted(e["in_flight"] for e in backend.endpoints()) == [2, 2]
        for chunks in streams:
            await chunks.aclose()  # type: ignore[attr-defined]
        await until(lambda: all(e["in_flight"] == 0 for e in backend.endpoints()))


async def test_conversation_hash_keeps_a_conversation_whatever_the_load(
    http: HttpClient, sims: list[VllmSim]
) -> None:
    for sim in sims:
        sim.decode_s_per_token = 0.01
    async with pool(http, sims, routing="conversation_hash") as backend:
        home = backend.choose(chat("x", session="alice"))
        streams = [
            await backend.stream(chat(f"s{i}", session="alice", max_tokens=500, stream=True))
            for i in range(3)
        ]
        busy = {e["url"]: e["in_flight"] for e in backend.endpoints()}
        assert home is not None and busy[home] == 3
        assert backend.choose(chat("y", session="alice")) == home
        for chunks in streams:
            await chunks.aclose()  # type: ignore[attr-defined]
        assert len({backend.choose(chat("x", session=f"user-{n}")) for n in range(60)}) == 3
        # without a session, the conversation's opening messages are the key
        opening = chat("first question", system="persona A")
        later = BackendRequest(
            "chat",
            {
                "model": "chat",
                "max_tokens": 4,
                "messages": [
                    {"role": "system", "content": "persona A"},
                    {"role": "user", "content": "first question"},
                    {"role": "assistant", "content": "an answer"},
                    {"role": "user", "content": "a follow-up"},
                ],
            },
            "r",
        )
        assert backend.choose(opening) == backend.choose(later)


# --- what the pool shows --------------------------------------------------------------------------


async def test_a_mixed_version_pool_is_scraped_alike(http: HttpClient) -> None:
    with VllmSim() as new, VllmSim(legacy_metrics=True) as old:
        assert "vllm:gpu_cache_usage_perc" in old.metrics_text()
        assert "vllm:gpu_cache_usage_perc" not in new.metrics_text()
        async with pool(http, [new, old], routing="round_robin") as backend:
            for sim in (new, old):
                sim.extra_running, sim.extra_waiting = 2, 5
            for i in range(4):
                await backend.complete(chat(f"q{i % 2}", system=SYSTEM))
            await until(
                lambda: all(
                    e["running"] == 2 and e["waiting"] == 5 and e["prefix_hit_rate"]
                    for e in backend.endpoints()
                )
            )
            for row in backend.endpoints():
                assert row["kv_cache_usage"] == 0.0
                assert 0 < row["prefix_hit_rate"] <= 1
            assert backend.load().queued == 10


async def test_each_decision_is_kept_with_its_estimates_for_admin(
    http: HttpClient, sims: list[VllmSim], caplog: pytest.LogCaptureFixture
) -> None:
    pair = sims[:2]
    async with pool(http, pair) as backend:
        with caplog.at_level(logging.DEBUG, logger="interlock.backends.vllm"):
            for i in range(3):
                await drain(await backend.stream(chat(f"question {i}", system=SYSTEM, stream=True)))
        logged = [r.getMessage() for r in caplog.records if "expected cached prefix" in r.getMessage()]
        assert len(logged) == 3 and "req-question 2" in logged[-1] and "cache saves" in logged[-1]
        decisions = backend.describe()["decisions"]
        assert isinstance(decisions, list) and len(decisions) == 3
        last = decisions[-1]
        home = max(pair, key=lambda s: s.served)
        assert last["endpoint"] == home.base_url.removesuffix("/v1")
        assert last["request_id"].startswith("req-question 2")
        assert last["expected_cached_tokens"] > 1000  # the system prompt, sent there twice before
        by_url = {e["url"]: e for e in last["estimates"]}
        assert set(by_url) == {s.base_url.removesuffix("/v1") for s in pair}
        chosen = by_url[last["endpoint"]]
        assert chosen["cached_tokens"] == last["expected_cached_tokens"]
        assert chosen["expected_ttft_ms"] == min(e["expected_ttft_ms"] for e in last["estimates"])
        assert chosen["saved_ms"] > 0 and {"wait_ms", "prefill_ms", "running"} <= set(chosen)
        fits = [e["ttft_fit"] for e in backend.endpoints()]
        assert sum(f["samples"] for f in fits) == 3, "every stream's first token is a sample for its endpoint"
