"""The vLLM pool's cost model (expected TTFT in time), its online fit, and ``auto``'s choice: pure tables."""

from __future__ import annotations

import random

import pytest

from backends.vllm.affinity import Ask, Candidate, decide
from backends.vllm.cost import BOUNDS, DEFAULTS, Coefficients, EndpointLoad, TtftFit, expected_ttft

C = Coefficients(base_s=0.01, prefill_s_per_token=4e-5, step_s_per_seq=1e-3, full_s_per_token=0.01)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_expected_ttft_adds_queue_own_prefill_running_and_a_full_servers_wait() -> None:
    idle = expected_ttft(C, EndpointLoad(), uncached_tokens=1000, cached_tokens=0)
    assert idle.ttft_s == pytest.approx(0.01 + 0.04)
    assert (idle.prefill_s, idle.wait_s) == (pytest.approx(0.04), pytest.approx(0.0))
    busy = expected_ttft(C, EndpointLoad(prefill_ahead=2000, running=20), 1000, 0)
    assert busy.wait_s == pytest.approx(2000 * 4e-5 + 20 * 1e-3)
    cached = expected_ttft(C, EndpointLoad(), uncached_tokens=100, cached_tokens=900)
    assert cached.saved_s == pytest.approx(900 * 4e-5)
    # 16 running of 16: the new one waits for the first to end, ~2/17 of a 32-token mean decode
    full = EndpointLoad(running=16, capacity=16, decode_left_per_seq=32)
    assert full.slots_short == 1 and full.full_wait_tokens == pytest.approx(2 * 32 / 16)
    assert EndpointLoad(running=15, capacity=16, decode_left_per_seq=32).full_wait_tokens == 0
    assert EndpointLoad(running=4, kv_usage=0.95, decode_left_per_seq=10).slots_short == pytest.approx(0.5)
    # requests waiting in a scrape alone do not mean full (arrivals mid-step wait for its end)
    assert EndpointLoad(running=4, waiting=3).slots_short == 0


def ask(tokens: int = 2000, session: str | None = None) -> Ask:
    return Ask(prompt_tokens=tokens, session=session)


def test_auto_takes_the_cache_unless_the_queue_there_costs_more_than_it_saves() -> None:
    home = Candidate("http://a", cached_blocks=28, load=EndpointLoad(running=10), coefficients=C)
    other = Candidate("http://b", load=EndpointLoad(running=8), coefficients=C)
    rng = random.Random(1)
    decision = decide("auto", [home, other], ask(), block_tokens=64, rng=rng)
    assert decision.chosen.name == "http://a"  # 1,792 cached tokens save ~72 ms, two more streams cost 2
    assert decision.cached_tokens == 28 * 64
    assert set(decision.estimates) == {"http://a", "http://b"}
    # the same prefix, but 3,000 prefill tokens queued at its holder (~120 ms): elsewhere is sooner
    queued = Candidate(
        "http://a", cached_blocks=28, load=EndpointLoad(prefill_ahead=3000, running=10), coefficients=C
    )
    assert decide("auto", [queued, other], ask(), block_tokens=64, rng=rng).chosen.name == "http://b"
    # a full holder: a slot frees only when a running reply ends
    full = Candidate(
        "http://a",
        cached_blocks=28,
        load=EndpointLoad(running=16, capacity=16, decode_left_per_seq=200),
        coefficients=C,
    )
    assert decide("auto", [full, other], ask(), block_tokens=64, rng=rng).chosen.name == "http://b"


def test_near_ties_go_to_the_longest_prefix_then_by_session_or_at_random_and_the_guard_caps() -> None:
    a = Candidate("http://a", load=EndpointLoad(running=1), coefficients=C)
    b = Candidate(
        "http://b", load=EndpointLoad(running=2), coefficients=C
    )  # 1 ms more: within a block's 2.6 ms
    picks = {
        decide("auto", [a, b], ask(), block_tokens=64, rng=random.Random(s)).chosen.name for s in range(20)
    }
    assert picks == {"http://a", "http://b"}
    by_session = {
        decide("auto", [a, b], ask(session="s1"), block_tokens=64, rng=random.Random(s)).chosen.name
        for s in range(20)
    }
    assert len(by_session) == 1
    # a tie with a prefix on one side: the prefix's holder, whatever the session or the draw
    one_block = Candidate("http://b", cached_blocks=1, load=EndpointLoad(running=2), coefficients=C)
    assert {
        decide(
            "auto", [a, one_block], ask(session=f"s{s}"), block_tokens=64, rng=random.Random(s)
        ).chosen.name
        for s in range(20)
    } == {"http://b"}
    holder = Candidate("http://a", cached_blocks=28, queued_tokens=9000, coefficients=C)
    idle = Candidate("http://b", coefficients=C)
    assert (
        decide("auto", [holder, idle], ask(), block_tokens=64, rng=random.Random(1)).chosen.name == "http://a"
    )
    capped = decide("auto", [holder, idle], ask(), block_tokens=64, rng=random.Random(1), load_guard=4096)
    assert capped.chosen.name == "http://b"


def test_the_fit_learns_the_coefficients_from_ttfts() -> None:
    clock = Clock()
    fit = TtftFit(clock)
    assert fit.coefficients == DEFAULTS
    rng = random.Random(1)
    for _ in range(300):
        x = (1.0, rng.uniform(0, 8000), rng.uniform(0, 30), 0.0)
        pending = fit.begin(x)
        clock.now += 0.002 + 2e-5 * x[1] + 2e-3 * x[2] + rng.gauss(0, 0.002)
        fit.first_token(pending)
        clock.now += 1.0
    c = fit.coefficients
    assert c.prefill_s_per_token == pytest.approx(2e-5, rel=0.1)
    assert c.step_s_per_seq == pytest.approx(2e-3, rel=0.15)
    assert c.base_s == pytest.approx(0.002, abs=0.003)
    assert fit.snapshot()["samples"] == 300


def test_the_fit_shrugs_off_outliers_and_stays_within_bounds() -> None:
    fit = TtftFit(Clock())
    rng = random.Random(2)
    for i in range(300):
        x = (1.0, rng.uniform(0, 4000), rng.uniform(0, 20), 0.0)
        y = 0.01 + 3e-5 * x[1] + 1e-3 * x[2]
        fit.observe(x, 30.0 if i % 25 == 0 else y)  # one stalled stream in 25
    c = fit.coefficients
    assert c.prefill_s_per_token == pytest.approx(3e-5, rel=0.3)
    assert fit.clipped >= 10
    fit.observe((1.0, 1000.0, 5.0, 0.0), -1.0)  # nonsense is ignored
    fit.observe((1.0, float("nan"), 5.0, 0.0), 0.1)
    assert fit.samples == 300
    cheap = TtftFit(Clock())
    for _ in range(200):  # TTFTs that would fit a negative cost: held at the bounds
        cheap.observe((1.0, 5000.0, 0.0, 0.0), 1e-4)
    low = cheap.coefficients
    assert low.prefill_s_per_token >= BOUNDS[0].prefill_s_per_token and low.base_s >= 0.0


def test_the_decode_step_is_measured_and_a_long_silence_relearns() -> None:
    clock = Clock()
    fit = TtftFit(clock, relearn_after_s=60)
    for _ in range(60):
        pending = fit.first_token(fit.begin((1.0, 100.0, 4.0, 0.0)))
        clock.now += 31 * 0.006  # 32 tokens, 6 ms a step
        fit.finished(pending, 32)
    assert fit.coefficients.full_s_per_token == pytest.approx(0.006, rel=0.01)
    fit.observe((1.0, 100.0, 4.0, 0.0), 0.05)
    settled = [row[:] for row in fit._p]
    clock.now += 120
    fit.observe((1.0, 100.0, 4.0, 0.0), 0.05)
    assert fit._p[0][0] > settled[0][0], "after a silence the fit is as open as the prior again"
