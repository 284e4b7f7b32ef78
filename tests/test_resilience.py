"""Chaos on loopback: the real gateway in front of ChaosUpstreams whose behaviour flips mid-test.

Every upstream is a ``kind: openai`` backend on its own ChaosUpstream; timeouts and backoffs are
short so failing paths stay fast. Clients are the official ``openai`` SDK with ``max_retries=0``
(whatever resilience the client sees is the gateway's) and plain httpx for headers and /admin.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any, TypeVar

import httpx
import openai
import pytest

from tests.conftest import run_gateway, wait_ready
from tests.fakes import ChaosUpstream, openai_backend

MESSAGES: list[Any] = [{"role": "user", "content": "Say hello."}]
CLIENT_KEY = "sk-resilience-client-0001"
ADMIN_KEY = "sk-resilience-admin-0002"
#: FakeUpstream/ChaosUpstream replies carry usage 5 prompt / 3 completion tokens
PROMPT_TOKENS, COMPLETION_TOKENS = 5, 3
T = TypeVar("T")


def resilience(**overrides: dict[str, Any]) -> dict[str, Any]:
    """Fast-failing defaults: a circuit opens after 3 failures in a row and stays open for the test."""
    base: dict[str, dict[str, Any]] = {
        "breaker": {"consecutive_failures": 3, "cooldown_s": 60, "max_cooldown_s": 120},
        "retry": {"attempts": 3, "backoff_initial_s": 0.001, "backoff_max_s": 0.01},
        "health_check": {"interval_s": 0},
    }
    for section, values in overrides.items():
        base[section] = {**base[section], **values}
    return base


def sdk(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=10)


def admin_routes(url: str, key: str | None = None) -> dict[str, Any]:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    response = httpx.get(url + "/admin/routes", headers=headers, timeout=5)
    assert response.status_code == 200, response.text
    return response.json()


def order_of(url: str, route: str, key: str | None = None) -> dict[str, dict[str, Any]]:
    """/admin/routes' entry per backend of one route."""
    return {entry["backend"]: entry for entry in admin_routes(url, key)["routes"][route]["order"]}


def chat(url: str, model: str, headers: dict[str, str] | None = None, **fields: Any) -> httpx.Response:
    return httpx.post(
        url + "/v1/chat/completions",
        headers=headers,
        timeout=10,
        json={"model": model, "messages": MESSAGES, **fields},
    )


def eventually(probe: Callable[[], T], done: Callable[[T], bool], what: str, timeout: float = 30) -> T:
    """``probe()`` once ``done`` holds for it. A stream's stats (and an upstream's counters) are
    recorded just after the client read its last byte, so asserting at once races them."""
    deadline = time.monotonic() + timeout
    while not done(value := probe()):
        assert time.monotonic() < deadline, f"{what}: still {value!r} after {timeout} s"
        time.sleep(0.02)
    return value


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    pos = (len(ordered) - 1) * 0.99
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


# --- one upstream failing, one healthy ------------------------------------------------------------

#: the code the router notes in the route reason for each way the bad upstream fails
FAILURE_CODES = {
    "error500": "server_error",
    "reset": "backend_unavailable",
    "timeout": "backend_timeout",
    "ratelimited": "backend_overloaded",
}


@pytest.mark.parametrize("mode", list(FAILURE_CODES))
def test_clients_are_served_while_one_upstream_fails(mode: str) -> None:
    with ChaosUpstream(mode=mode) as bad, ChaosUpstream() as good:
        config = {
            "backends": {
                "bad": openai_backend(bad.base_url, first_token=0.3),
                "good": openai_backend(good.base_url, first_token=2.0),
            },
            "models": {"m": {"targets": ["bad", "good"]}},
            "resilience": resilience(),
        }
        with run_gateway(config) as url, sdk(url) as client:
            reasons = []
            for _ in range(50):
                raw = client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
                assert raw.headers["x-interlock-backend"] == "good"
                reasons.append(raw.headers["x-interlock-route-reason"])
                assert raw.parse().choices[0].message.content == "Hello there."
            for _ in range(20):
                raw_stream = client.chat.completions.with_raw_response.create(
                    model="m", messages=MESSAGES, stream=True
                )
                assert raw_stream.headers["x-interlock-backend"] == "good"
                reasons.append(raw_stream.headers["x-interlock-route-reason"])
                text = "".join(
                    event.choices[0].delta.content or "" for event in raw_stream.parse() if event.choices
                )
                assert text == "Hello there."

            # the first requests tried the bad upstream first; after that its circuit was open (three
            # failures in a row), or, for a 429 that said when to come back, it was skipped until then
            # with its circuit closed: a rate limit is busy, not broken
            limited = mode == "ratelimited"
            trips_after = 1 if limited else 3
            after = f"ordered: position 2 in targets; after bad: {FAILURE_CODES[mode]}"
            assert reasons[:trips_after] == [after] * trips_after
            assert reasons[trips_after:] == ["ordered: position 2 in targets"] * (70 - trips_after)
            # a reset is retried once inside the HTTP client (it looks like a stale keep-alive)
            assert trips_after <= bad.received <= (6 if mode == "reset" else trips_after)
            assert bad.completed == 0
            eventually(
                lambda: (good.received, good.completed),
                lambda seen: seen == (70, 70),
                "good upstream's (received, completed)",
            )

            order = eventually(
                lambda: order_of(url, "m"),
                lambda o: (o["good"]["stats"]["samples"], o["good"]["stats"]["in_flight"]) == (70, 0),
                "good's stats",
            )
            assert [name for name in order] == ["bad", "good"]
            breaker = order["bad"]["breaker"]
            bad_stats = order["bad"]["stats"]
            if limited:
                assert (breaker["state"], breaker["trips"], breaker["failures_in_window"]) == ("closed", 0, 0)
                assert (bad_stats["samples"], bad_stats["error_rate"]) == (0, 0.0)
            else:
                assert (breaker["state"], breaker["trips"]) == ("open", 1)
                assert breaker["consecutive_failures"] == trips_after
                assert breaker["retry_in_s"] > 50
                assert (bad_stats["samples"], bad_stats["error_rate"]) == (trips_after, 1.0)
            assert order["good"]["breaker"]["state"] == "closed"
            assert (order["good"]["stats"]["samples"], order["good"]["stats"]["error_rate"]) == (70, 0.0)
            assert order["good"]["stats"]["in_flight"] == 0


def test_a_rate_limited_upstream_is_skipped_for_its_retry_after_with_its_circuit_closed() -> None:
    with ChaosUpstream(mode="ratelimited", retry_after=30) as limited:
        config = {
            "backends": {"limited": openai_backend(limited.base_url)},
            "models": {"m": {"targets": ["limited"]}},
            "resilience": resilience(
                breaker={"consecutive_failures": 1, "cooldown_s": 1, "max_cooldown_s": 5}
            ),
        }
        with run_gateway(config) as url:
            first = chat(url, "m")
            assert first.status_code == 429
            assert first.headers["retry-after"] == "30"
            assert first.json()["error"]["type"] == "overloaded_error"

            second = chat(url, "m")  # not sent before the upstream's date: refused without a call
            assert second.status_code == 429
            assert 29 <= int(second.headers["retry-after"]) <= 30
            assert limited.received == 1

            breaker = order_of(url, "m")["limited"]["breaker"]
            assert (breaker["state"], breaker["failures_in_window"]) == ("closed", 0)
            assert httpx.get(url + "/health/ready", timeout=5).status_code == 200


# --- readiness ------------------------------------------------------------------------------------


def test_readiness_follows_the_only_backend_of_a_route() -> None:
    with ChaosUpstream() as solo, ChaosUpstream() as other:
        config = {
            "backends": {
                "solo-up": openai_backend(solo.base_url),
                "other-up": openai_backend(other.base_url),
            },
            "models": {"solo": {"targets": ["solo-up"], "attempts": 1}, "other": {"targets": ["other-up"]}},
            "resilience": resilience(
                breaker={"consecutive_failures": 2, "cooldown_s": 1.5},
                health_check={"interval_s": 0.1, "timeout_s": 1},
            ),
        }
        with run_gateway(config) as url:
            wait_ready(url, timeout=10)
            solo.mode = "error500"
            # The first request fails through (502); by the second, the active health check may
            # have counted the second failure already and opened the circuit (503).
            statuses = [chat(url, "solo").status_code for _ in range(2)]
            assert statuses in ([502, 502], [502, 503])
            tripped = time.monotonic()

            # one model's dead backend does not take the replica out of service for the other model
            ready = httpx.get(url + "/health/ready", timeout=5)
            assert ready.status_code == 200
            body = ready.json()
            assert body["models"]["other"] == "ready"
            assert body["models"]["solo"].startswith("solo-up: circuit open")

            solo.mode = "ok"
            deadline = tripped + 10
            while (models := httpx.get(url + "/health/ready", timeout=5).json()["models"])["solo"] != "ready":
                assert time.monotonic() < deadline, "readiness never recovered"
                time.sleep(0.05)
            assert time.monotonic() - tripped >= 1.0, "ready again before the cool-down ended"
            assert models == {"solo": "ready", "other": "ready"}
            response = chat(url, "solo")
            assert response.status_code == 200
            assert response.headers["x-interlock-backend"] == "solo-up"


def test_active_health_checks_ask_the_upstream() -> None:
    with ChaosUpstream(mode="error500") as dead:
        config = {
            "backends": {"dead": openai_backend(dead.base_url)},
            "models": {"m": {"targets": ["dead"]}},
            "resilience": resilience(health_check={"interval_s": 0.05, "timeout_s": 1}),
        }
        with run_gateway(config) as url:
            entry = eventually(
                lambda: order_of(url, "m")["dead"],
                lambda e: e["healthy"] is False,
                "the dead upstream's health",
            )
            assert dead.models_requests >= 1
            assert entry["healthy"] is False


# --- a gateway with client keys: admin, cost, headers, broken streams ----------------------------


def sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


PRICE = {"input_per_mtok": 2.0, "output_per_mtok": 10.0}


@pytest.fixture(scope="module")
def keyed() -> Iterator[tuple[str, ChaosUpstream, ChaosUpstream]]:
    with ExitStack() as stack:
        good = stack.enter_context(ChaosUpstream())
        cutter = stack.enter_context(ChaosUpstream(mode="cut"))
        config = {
            "auth": {
                "keys": [
                    {"name": "client", "sha256": sha256(CLIENT_KEY)},
                    {"name": "ops", "sha256": sha256(ADMIN_KEY), "admin": True},
                ]
            },
            "backends": {
                "priced": openai_backend(good.base_url, price=PRICE),
                "free": openai_backend(good.base_url),
                "cutter": openai_backend(cutter.base_url),
            },
            "models": {"m": {"targets": ["priced", "free"], "attempts": 2}, "cut": {"targets": ["cutter"]}},
            "resilience": resilience(),
        }
        url = stack.enter_context(run_gateway(config))
        yield url, good, cutter


def test_admin_routes_needs_an_admin_key(keyed: tuple[str, ChaosUpstream, ChaosUpstream]) -> None:
    url, _, _ = keyed
    assert httpx.get(url + "/admin/routes", timeout=5).status_code == 401
    refused = httpx.get(url + "/admin/routes", headers={"authorization": f"Bearer {CLIENT_KEY}"}, timeout=5)
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "admin_only"

    report = admin_routes(url, ADMIN_KEY)
    assert set(report["routes"]) == {"m", "cut"}
    route = report["routes"]["m"]
    assert (route["policy"], route["attempts"], route["hedge"]) == ("ordered", 2, False)
    assert [entry["backend"] for entry in route["order"]] == ["priced", "free"]
    for entry in route["order"]:
        assert {"reason", "breaker", "stats", "healthy", "load", "price"} <= set(entry)
        assert entry["breaker"]["state"] == "closed"
        assert entry["stats"]["name"] == entry["backend"]
    assert route["order"][0]["price"] == PRICE
    assert set(report["retry_budget"]) == {"requests_in_window", "retries_in_window", "limit", "available"}


def test_cost_header_is_usage_times_price(keyed: tuple[str, ChaosUpstream, ChaosUpstream]) -> None:
    url, _, _ = keyed
    auth = {"authorization": f"Bearer {CLIENT_KEY}"}
    before = order_of(url, "m", ADMIN_KEY)["priced"]["stats"]["samples"]
    for _ in range(3):
        response = chat(url, "m", auth)
        assert response.status_code == 200
        assert response.headers["x-interlock-backend"] == "priced"
        usage = response.json()["usage"]
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == (PROMPT_TOKENS, COMPLETION_TOKENS)
        expected = (
            PROMPT_TOKENS * PRICE["input_per_mtok"] + COMPLETION_TOKENS * PRICE["output_per_mtok"]
        ) / 1e6
        assert response.headers["x-interlock-cost-usd"] == f"{expected:.8f}" == "0.00004000"
    assert order_of(url, "m", ADMIN_KEY)["priced"]["stats"]["samples"] == before + 3

    streamed = chat(url, "m", auth, stream=True)
    assert streamed.status_code == 200
    assert "x-interlock-cost-usd" not in streamed.headers  # usage is not known when headers go out


def test_bad_ttft_budget_header_is_a_400_naming_it(keyed: tuple[str, ChaosUpstream, ChaosUpstream]) -> None:
    url, good, _ = keyed
    received = good.received
    auth = {"authorization": f"Bearer {CLIENT_KEY}"}
    for bad in ("abc", "-5", "0", "nan"):
        response = chat(url, "m", {**auth, "x-interlock-max-ttft-ms": bad})
        assert response.status_code == 400, bad
        error = response.json()["error"]
        assert (error["type"], error["param"]) == ("invalid_request_error", "x-interlock-max-ttft-ms")
    with sdk(url, CLIENT_KEY) as client, pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="m", messages=MESSAGES, extra_headers={"x-interlock-max-ttft-ms": "abc"}
        )
    assert caught.value.body["param"] == "x-interlock-max-ttft-ms"  # type: ignore[index]
    assert good.received == received, "a request with a bad header reached an upstream"
    assert chat(url, "m", {**auth, "x-interlock-max-ttft-ms": "250"}).status_code == 200


def test_mid_stream_cut_is_an_sdk_error_and_a_failure_in_stats(
    keyed: tuple[str, ChaosUpstream, ChaosUpstream],
) -> None:
    url, _, cutter = keyed
    before = order_of(url, "cut", ADMIN_KEY)["cutter"]["stats"]
    text = ""
    with sdk(url, CLIENT_KEY) as client:
        stream = client.chat.completions.create(model="cut", messages=MESSAGES, stream=True)
        with pytest.raises(openai.APIError) as caught:
            for event in stream:
                if event.choices:
                    text += event.choices[0].delta.content or ""
    assert text == "Hello"
    assert not isinstance(caught.value, openai.APIStatusError)  # the status was 200: raised mid-stream
    assert caught.value.body["code"] == "backend_unavailable"  # type: ignore[index]
    assert cutter.by_mode["cut"] >= 1
    stats = eventually(
        lambda: order_of(url, "cut", ADMIN_KEY)["cutter"]["stats"],
        lambda s: s["samples"] == before["samples"] + 1 and s["in_flight"] == 0,
        "cutter's stats",
    )
    assert stats["error_rate"] > 0
    assert stats["in_flight"] == 0


# --- hedging against a slow tail ------------------------------------------------------------------

#: with seed 5 and chance 0.1, draws 6, 16 and 26 are slow: none in the 5 warm-up requests,
#: three among the 40 measured
TAIL_SEED = 5
WARM_UP, MEASURED = 5, 40
SLOW_S = 1.0


def ttfts(url: str, model: str, n: int) -> list[float]:
    """Seconds to the first body bytes of ``n`` streamed requests, one after another."""
    out = []
    with httpx.Client(base_url=url, timeout=10) as http:
        for _ in range(n):
            started = time.perf_counter()
            with http.stream(
                "POST", "/v1/chat/completions", json={"model": model, "messages": MESSAGES, "stream": True}
            ) as response:
                assert response.status_code == 200
                chunks = response.iter_raw()
                first = next(chunks)
                out.append(time.perf_counter() - started)
                body = first + b"".join(chunks)
                assert body.endswith(b"data: [DONE]\n\n"), body
    return out


def test_hedging_cuts_the_slow_tail() -> None:
    def tail() -> ChaosUpstream:
        return ChaosUpstream(mode="slow_first_byte", chance=0.1, seed=TAIL_SEED, slow_s=SLOW_S)

    with tail() as tail_h, ChaosUpstream() as fast_h, tail() as tail_p, ChaosUpstream() as fast_p:

        def backend(upstream: ChaosUpstream) -> dict[str, object]:
            return openai_backend(upstream.base_url, first_token=3.0)

        config = {
            "backends": {
                "tail-h": backend(tail_h),
                "fast-h": backend(fast_h),
                "tail-p": backend(tail_p),
                "fast-p": backend(fast_p),
            },
            "models": {
                "hedged": {"targets": ["tail-h", "fast-h"], "hedge": True},
                "plain": {"targets": ["tail-p", "fast-p"]},
            },
            "resilience": resilience(),
        }
        with run_gateway(config) as url:
            ttfts(url, "hedged", WARM_UP)
            ttfts(url, "plain", WARM_UP)
            assert tail_h.by_mode["slow_first_byte"] == tail_p.by_mode["slow_first_byte"] == 0
            hedged = ttfts(url, "hedged", MEASURED)
            plain = ttfts(url, "plain", MEASURED)

    # both tails drew the same three slow requests; only the plain route made its clients wait
    assert tail_h.by_mode["slow_first_byte"] == tail_p.by_mode["slow_first_byte"] == 3
    assert fast_p.received == 0
    assert 3 <= fast_h.received <= MEASURED  # every slow request was hedged
    assert p99(plain) >= SLOW_S * 0.9
    assert p99(hedged) < p99(plain) / 2, f"hedged p99 {p99(hedged):.3f}s vs plain {p99(plain):.3f}s"
