"""The response cache through the real gateway and the official openai SDK, with a real Redis.

Every test sends prompts of its own (a fresh id in the text), so entries left in the shared
Redis by another run can never answer for it.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import run_gateway
from tests.fakes import ChaosUpstream, FakeUpstream, openai_backend
from tests.redis_servers import REDIS_SERVER, RedisServer

REDIS = "redis://127.0.0.1:6379/13"
DETERMINISTIC = {"temperature": 0}


def config(
    url: str,
    model: str = "ok",
    cache: dict[str, Any] | None = None,
    keys: list[dict[str, Any]] | None = None,
    section: dict[str, Any] | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "backends": {"up": openai_backend(url, model, first_token=10.0)},
        "models": {
            "m": {"targets": ["up"], "cache": cache if cache is not None else {"ttl_s": 60}},
            "plain": {"targets": ["up"]},
        },
        "resilience": {"health_check": {"interval_s": 0}},
    }
    if keys:
        out["auth"] = {"keys": keys}
    if section:
        out["cache"] = section
    return out


def messages() -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Say hello. ({uuid.uuid4().hex})"}]


def sdk(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=20)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream(slow_s=0.5) as upstream:
        yield upstream


@pytest.fixture(scope="module")
def gateway(fake: FakeUpstream) -> Iterator[str]:
    with run_gateway(config(fake.base_url), redis_url=REDIS) as url:
        yield url


def calls(fake: FakeUpstream, text: str) -> int:
    return sum(1 for r in fake.requests if text in str(r.get("messages")))


@pytest.mark.parametrize(
    ("first_stream", "second_stream"), [(False, False), (False, True), (True, False), (True, True)]
)
def test_a_miss_then_a_hit_in_either_shape(
    gateway: str, fake: FakeUpstream, first_stream: bool, second_stream: bool
) -> None:
    client, msgs = sdk(gateway), messages()

    def ask(stream: bool) -> tuple[str, httpx.Headers]:
        raw = client.chat.completions.with_raw_response.create(
            model="m", messages=msgs, stream=stream, **DETERMINISTIC
        )
        if stream:
            return "".join(e.choices[0].delta.content or "" for e in raw.parse() if e.choices), raw.headers
        return raw.parse().choices[0].message.content or "", raw.headers

    text, headers = ask(first_stream)
    assert (text, headers["x-interlock-cache"], headers["x-interlock-backend"]) == (
        "Hello there.",
        "miss",
        "up",
    )
    text, headers = ask(second_stream)
    assert (text, headers["x-interlock-cache"], headers["x-interlock-backend"]) == (
        "Hello there.",
        "hit",
        "cache",
    )
    assert int(headers["age"]) >= 0 and headers["x-interlock-cost-usd"] == "0.00000000"
    assert calls(fake, msgs[0]["content"]) == 1


def test_a_hit_reports_its_prompt_tokens_as_cached_and_usage_only_when_asked(gateway: str) -> None:
    client, msgs = sdk(gateway), messages()
    first = client.chat.completions.create(model="m", messages=msgs, **DETERMINISTIC)
    again = client.chat.completions.create(model="m", messages=msgs, **DETERMINISTIC)
    assert again.usage is not None and first.usage is not None
    assert again.usage.prompt_tokens == first.usage.prompt_tokens
    assert again.usage.prompt_tokens_details is not None
    assert again.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens
    with_usage = list(
        client.chat.completions.create(
            model="m", messages=msgs, stream=True, stream_options={"include_usage": True}, **DETERMINISTIC
        )
    )
    assert with_usage[-1].usage is not None and not with_usage[-1].choices
    without = list(client.chat.completions.create(model="m", messages=msgs, stream=True, **DETERMINISTIC))
    assert all(e.usage is None for e in without)


def test_sampled_requests_and_no_store_bypass_the_cache(gateway: str, fake: FakeUpstream) -> None:
    client, msgs = sdk(gateway), messages()
    for _ in range(2):
        raw = client.chat.completions.with_raw_response.create(model="m", messages=msgs, temperature=0.7)
        assert raw.headers["x-interlock-cache"] == "bypass"
        raw = client.chat.completions.with_raw_response.create(
            model="m", messages=msgs, extra_headers={"cache-control": "no-store"}, **DETERMINISTIC
        )
        assert raw.headers["x-interlock-cache"] == "bypass"
    assert calls(fake, msgs[0]["content"]) == 4
    raw = client.chat.completions.with_raw_response.create(model="plain", messages=msgs, **DETERMINISTIC)
    assert "x-interlock-cache" not in raw.headers  # a route without cache: says nothing


def test_no_cache_skips_the_read_but_still_stores(gateway: str, fake: FakeUpstream) -> None:
    client, msgs = sdk(gateway), messages()
    client.chat.completions.create(model="m", messages=msgs, **DETERMINISTIC)
    raw = client.chat.completions.with_raw_response.create(
        model="m", messages=msgs, extra_headers={"cache-control": "no-cache"}, **DETERMINISTIC
    )
    assert raw.headers["x-interlock-cache"] == "miss"
    assert calls(fake, msgs[0]["content"]) == 2
    raw = client.chat.completions.with_raw_response.create(model="m", messages=msgs, **DETERMINISTIC)
    assert raw.headers["x-interlock-cache"] == "hit"


@pytest.mark.parametrize("stream", [False, True])
def test_only_if_cached_is_a_504_on_a_miss(gateway: str, fake: FakeUpstream, stream: bool) -> None:
    client, msgs = sdk(gateway), messages()
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(
            model="m",
            messages=msgs,
            stream=stream,
            extra_headers={"cache-control": "only-if-cached"},
            **DETERMINISTIC,
        )
    assert caught.value.status_code == 504
    assert caught.value.body["code"] == "not_cached"  # type: ignore[index]
    assert calls(fake, msgs[0]["content"]) == 0


def sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def test_two_tenants_never_share_an_entry(fake: FakeUpstream) -> None:
    keys = [
        {"name": "alice", "sha256": sha256("sk-alice-000000001")},
        {"name": "bob", "sha256": sha256("sk-bob-0000000000002")},
    ]
    msgs = messages()
    with run_gateway(config(fake.base_url, keys=keys), redis_url=REDIS) as url:
        for key in ("sk-alice-000000001", "sk-bob-0000000000002"):
            raw = sdk(url, key).chat.completions.with_raw_response.create(
                model="m", messages=msgs, **DETERMINISTIC
            )
            assert raw.headers["x-interlock-cache"] == "miss"
        raw = sdk(url, "sk-bob-0000000000002").chat.completions.with_raw_response.create(
            model="m", messages=msgs, **DETERMINISTIC
        )
        assert raw.headers["x-interlock-cache"] == "hit"
    assert calls(fake, msgs[0]["content"]) == 2


@pytest.mark.parametrize("model", ["cut", "error500", "garbage"])
def test_a_broken_answer_is_never_stored(model: str) -> None:
    with FakeUpstream() as fake, run_gateway(config(fake.base_url, model), redis_url=REDIS) as url:
        msgs = messages()
        body = {"model": "m", "messages": msgs, "stream": model == "cut", **DETERMINISTIC}
        for _ in range(2):
            httpx.post(url + "/v1/chat/completions", json=body, timeout=10)
        assert calls(fake, msgs[0]["content"]) >= 2, "a broken answer was served from the cache"


def test_a_client_that_leaves_mid_stream_stores_nothing() -> None:
    with FakeUpstream() as fake, run_gateway(config(fake.base_url, "long"), redis_url=REDIS) as url:
        msgs = messages()
        body = {"model": "m", "messages": msgs, "stream": True, **DETERMINISTIC}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=10) as response:
            for line in response.iter_lines():
                if "more" in line:
                    break  # leave after the first few chunks
        fake.disconnected.wait(5)
        raw = httpx.post(url + "/v1/chat/completions", json={**body, "stream": False}, timeout=10)
        assert raw.headers["x-interlock-cache"] == "miss"


def test_stale_if_error_when_every_candidate_fails() -> None:
    cache = {"ttl_s": 0.2, "stale_if_error_s": 60}
    with ChaosUpstream() as chaos, run_gateway(config(chaos.base_url, cache=cache), redis_url=REDIS) as url:
        client, msgs = sdk(url), messages()
        first = client.chat.completions.create(model="m", messages=msgs, **DETERMINISTIC)
        # wait until the entry is no longer fresh: an only-if-cached request then gets its 504
        deadline = time.monotonic() + 10
        while (
            httpx.post(
                url + "/v1/chat/completions",
                timeout=5,
                headers={"cache-control": "only-if-cached"},
                json={"model": "m", "messages": msgs, **DETERMINISTIC},
            ).status_code
            != 504
        ):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        chaos.mode = "error500"
        for stream in (False, True):
            raw = client.chat.completions.with_raw_response.create(
                model="m", messages=msgs, stream=stream, **DETERMINISTIC
            )
            assert raw.headers["x-interlock-cache"] == "stale"
            if not stream:
                assert raw.parse().choices[0].message.content == first.choices[0].message.content
        other = messages()  # nothing stale to fall back on: the failure shows
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="m", messages=other, **DETERMINISTIC)


async def _burst(urls: list[str], n: int, msgs: list[dict[str, str]]) -> list[httpx.Response]:
    body = {"model": "m", "messages": msgs, **DETERMINISTIC}
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=n)) as client:
        return await asyncio.gather(
            *(client.post(urls[i % len(urls)] + "/v1/chat/completions", json=body) for i in range(n))
        )


def test_identical_requests_in_flight_over_three_replicas_make_one_upstream_call() -> None:
    # FakeUpstream "slow": the answer takes 1 s, so all 100 arrive while the first is in flight. The
    # three replicas share this process (and its GIL) here, so Redis calls get a wider timeout than
    # the default 20 ms: a replica whose lock call times out leads its own requests, by design.
    with FakeUpstream(slow_s=1.0) as fake, ExitStack() as stack:
        urls = [
            stack.enter_context(
                run_gateway(
                    config(fake.base_url, "slow", section={"redis_timeout_ms": 1000}), redis_url=REDIS
                )
            )
            for _ in range(3)
        ]
        msgs = messages()
        responses = asyncio.run(_burst(urls, 100, msgs))
        assert [r.status_code for r in responses] == [200] * 100
        assert {r.json()["choices"][0]["message"]["content"] for r in responses} == {"Hello there."}
        assert calls(fake, msgs[0]["content"]) == 1
        assert sorted({r.headers["x-interlock-cache"] for r in responses}) == ["hit", "miss"]


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")
def test_redis_paused_or_killed_fails_no_request(tmp_path: Path, fake: FakeUpstream) -> None:
    server = RedisServer(tmp_path)
    server.start()
    try:
        with run_gateway(config(fake.base_url), redis_url=f"redis://127.0.0.1:{server.port}/0") as url:
            client, msgs = sdk(url), messages()
            client.chat.completions.create(model="m", messages=msgs, **DETERMINISTIC)
            import redis as redis_client

            redis_client.Redis(port=server.port).execute_command("CLIENT", "PAUSE", "3000")
            for _ in range(5):
                started = time.monotonic()
                fresh = messages()
                reply = client.chat.completions.create(model="m", messages=fresh, **DETERMINISTIC)
                assert reply.choices[0].message.content == "Hello there."
                assert time.monotonic() - started < 2.0, "a paused Redis held a request"
            ready = httpx.get(url + "/health/ready", timeout=5)
            assert ready.status_code == 200 and ready.json()["cache"].startswith("degraded")
            server.stop()
            for _ in range(5):
                reply = client.chat.completions.create(model="m", messages=messages(), **DETERMINISTIC)
                assert reply.choices[0].message.content == "Hello there."
            # the in-process tier still answers what it holds
            raw = client.chat.completions.with_raw_response.create(model="m", messages=msgs, **DETERMINISTIC)
            assert raw.headers["x-interlock-cache"] == "hit"
    finally:
        server.stop()
