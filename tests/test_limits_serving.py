"""Limits through a real gateway on loopback, in process memory (no Redis): the headers on every
response, the refusals' status and body, the usage chunk asked for and stripped."""

from __future__ import annotations

import time

import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import run_gateway
from tests.usage_upstream import UsageUpstream


def config(upstream: str, limits: dict[str, object]) -> dict[str, object]:
    return {
        "backends": {
            "up": {
                "kind": "openai",
                "base_url": upstream,
                "model": "m",
                "price": {"input_per_mtok": 1000, "output_per_mtok": 1000},
            }
        },
        "models": {"chat": {"targets": ["up"]}},
        "resilience": {"health_check": {"interval_s": 0}},
        "limits": limits,
    }


def chat(**extra: object) -> dict[str, object]:
    return {"model": "chat", "messages": [{"role": "user", "content": "hi"}], **extra}


def test_headers_refusal_and_usage_chunk() -> None:
    limits = {"default_max_tokens": 50, "keys": {"*": {"rpm": 3, "tpm": 100_000}}}
    with UsageUpstream() as up, run_gateway(config(up.base_url, limits)) as url:
        whole = httpx.post(url + "/v1/chat/completions", json=chat(max_tokens=20))
        assert whole.status_code == 200
        assert whole.headers["x-ratelimit-limit-requests"] == "3"
        assert whole.headers["x-ratelimit-remaining-requests"] == "2"
        assert whole.headers["x-ratelimit-reset-requests"] == "20s"
        assert whole.headers["x-ratelimit-limit-tokens"] == "100000"
        assert int(whole.headers["x-ratelimit-remaining-tokens"]) < 100_000

        with httpx.stream("POST", url + "/v1/chat/completions", json=chat(stream=True)) as stream:
            assert stream.headers["x-ratelimit-remaining-requests"] == "1"  # before the first byte
            text = b"".join(stream.iter_bytes())
        assert b'"usage"' not in text and text.endswith(b"data: [DONE]\n\n")
        sent = up.requests[-1]
        assert sent["stream_options"] == {"include_usage": True} and sent["max_tokens"] == 50

        asked = httpx.post(
            url + "/v1/chat/completions", json=chat(stream=True, stream_options={"include_usage": True})
        )
        assert b'"usage"' in asked.content

        refused = httpx.post(url + "/v1/chat/completions", json=chat())
        assert refused.status_code == 429
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert refused.headers["retry-after"] == "20"
        assert 19_000 < int(refused.headers["retry-after-ms"]) <= 20_000
        error = orjson.loads(refused.content)["error"]
        assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
        assert "key anonymous" in error["message"] and "limit 3" in error["message"]
        # the status page lists the scope as throttled now, with its wait
        limits = httpx.get(url + "/status.json").json()["limits"]
        assert limits["configured"] is True and limits["mode"] == "memory"
        [throttled] = limits["throttled"]
        assert throttled["key"] == "key anonymous" and throttled["limit"] == "rpm"
        assert 0 < throttled["retry_in_s"] <= 20


def test_a_spent_budget_is_insufficient_quota_and_a_too_large_request_is_named() -> None:
    # $1000 per million tokens: 2 cents buy 20 tokens
    limits = {"keys": {"*": {"usd": {"amount": 0.05, "period": "1d"}, "tpm": 500}}}
    with UsageUpstream() as up, run_gateway(config(up.base_url, limits)) as url:
        huge = httpx.post(url + "/v1/chat/completions", json=chat(max_tokens=1000))
        assert huge.status_code == 429 and "more than the whole spending budget" in huge.text
        assert huge.json()["error"]["code"] == "insufficient_quota"
        statuses = [
            httpx.post(url + "/v1/chat/completions", json=chat(max_tokens=10)).status_code for _ in range(8)
        ]
        assert 200 in statuses and statuses[-1] == 429
        last = httpx.post(url + "/v1/chat/completions", json=chat(max_tokens=10))
        assert last.json()["error"]["code"] == "insufficient_quota"


def test_max_parallel_and_no_limits_no_headers() -> None:
    limits = {"keys": {"*": {"max_parallel": 1}}}
    with UsageUpstream() as up, run_gateway(config(up.base_url, limits)) as url:
        with httpx.stream("POST", url + "/v1/chat/completions", json={**chat(stream=True), "model": "chat"}):
            pass
        assert httpx.post(url + "/v1/chat/completions", json=chat()).status_code == 200
        assert (
            "x-ratelimit-limit-requests" not in httpx.post(url + "/v1/chat/completions", json=chat()).headers
        )


def test_a_cache_hit_gives_its_reservation_back_and_a_client_that_left_frees_its_slot() -> None:
    with UsageUpstream(token_s=0.05) as up:
        cfg = config(
            up.base_url, {"default_max_tokens": 100, "keys": {"*": {"tpm": 10_000, "max_parallel": 1}}}
        )
        cfg["models"] = {"chat": {"targets": ["up"], "cache": {"ttl_s": 60}}, "live": {"targets": ["up"]}}
        with run_gateway(cfg) as url:
            body = chat(temperature=0, max_tokens=40)
            first = httpx.post(url + "/v1/chat/completions", json=body)
            assert first.status_code == 200 and first.headers["x-interlock-cache"] == "miss"
            hit = httpx.post(url + "/v1/chat/completions", json=body)
            assert hit.headers["x-interlock-cache"] == "hit"
            # the hit reserved and then gave all of it back: the next request sees no less left
            after = httpx.post(url + "/v1/chat/completions", json=body)
            left_after_hit = int(hit.headers["x-ratelimit-remaining-tokens"])
            assert int(after.headers["x-ratelimit-remaining-tokens"]) >= left_after_hit

            with httpx.Client(timeout=30) as client:
                request = client.build_request(
                    "POST", url + "/v1/chat/completions", json=chat(model="live", stream=True, max_tokens=100)
                )
                response = client.send(request, stream=True)
                chunks = response.iter_bytes()
                next(chunks)
                busy = httpx.post(url + "/v1/chat/completions", json=chat(model="live"))
                assert busy.status_code == 429 and "requests in parallel" in busy.json()["error"]["message"]
                response.close()  # the client leaves mid-stream
            deadline = time.monotonic() + 10
            while httpx.post(url + "/v1/chat/completions", json=chat(model="live")).status_code != 200:
                assert time.monotonic() < deadline, "a client that left kept its slot"
                time.sleep(0.05)


def test_limit_decisions_on_metrics() -> None:
    limits = {"keys": {"*": {"rpm": 1, "tpm": 100_000}}}
    with UsageUpstream() as up, run_gateway(config(up.base_url, limits)) as url:
        assert httpx.post(url + "/v1/chat/completions", json=chat(max_tokens=5)).status_code == 200
        assert httpx.post(url + "/v1/chat/completions", json=chat(max_tokens=5)).status_code == 429
        families = {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}
    counts = {
        (s.labels["kind"], s.labels["tier"], s.labels["result"]): s.value
        for s in families["interlock_limit_decisions"].samples
        if s.name.endswith("_total")
    }
    # the second request: refused by rpm; its tpm check passed (and took nothing)
    assert counts == {
        ("rpm", "memory", "admitted"): 1,
        ("rpm", "memory", "refused"): 1,
        ("tpm", "memory", "admitted"): 2,
    }
    tiers = {s.labels["tier"]: s.value for s in families["interlock_limits_tier"].samples}
    assert tiers == {"memory": 1, "redis": 0, "fallback": 0}
