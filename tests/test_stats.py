"""gateway.stats.BackendStats on known data, with a fake clock (no sleeps)."""

from __future__ import annotations

import random

import pytest

from gateway.stats import BackendStats
from policies.base import BackendView, cost_usd
from tests.fakes import Clock


def make(**kwargs: object) -> tuple[BackendStats, Clock]:
    clock = Clock(500.0)
    return BackendStats("b1", clock=clock, **kwargs), clock  # type: ignore[arg-type]


def test_empty_stats() -> None:
    stats, _ = make()
    view = stats.view(price_in=1, price_out=2, capacity=None)
    assert view.samples == 0 and view.cold
    assert view.ttft_ms is None and view.ttft_p50_ms is None and view.ttft_p95_ms is None
    assert view.tpot_ms is None and view.ttft_base_ms is None and view.ttft_per_token_ms == 0
    assert view.error_rate == 0 and view.in_flight == 0
    assert stats.snapshot()["ttft_ms"] is None


@pytest.mark.parametrize(("alpha", "expected"), [(0.2, [100, 120, 106]), (0.5, [100, 150, 100])])
def test_ttft_ewma(alpha: float, expected: list[float]) -> None:
    stats, _ = make(alpha=alpha)
    for ms, want in zip((100, 200, 50), expected, strict=True):
        stats.first_token(10, ms / 1000)
        assert stats.ttft.ewma == pytest.approx(want)  # the first sample is the estimate itself


def test_default_alpha_is_0_2() -> None:
    stats = BackendStats("b")
    stats.first_token(10, 0.100)
    stats.first_token(10, 0.200)
    assert stats.ttft.ewma == pytest.approx(120)


def test_quantiles_on_known_data() -> None:
    stats, _ = make()
    values = list(range(1, 101))
    random.Random(7).shuffle(values)  # order must not matter
    for ms in values:
        stats.first_token(10, ms / 1000)
    view = stats.view(0, 0, None)
    assert view.ttft_p50_ms == pytest.approx(50.5)
    assert view.ttft_p95_ms == pytest.approx(95.05)


def test_quantiles_cover_only_the_recent_window() -> None:
    stats, _ = make(window=10)
    for ms in range(1, 101):
        stats.first_token(10, ms / 1000)
    view = stats.view(0, 0, None)
    assert view.ttft_p50_ms == pytest.approx(95.5)  # 91..100
    assert view.ttft_p95_ms == pytest.approx(99.55)
    stats.first_token(10, 1.0)  # the quantile cache must see new data
    assert stats.view(0, 0, None).ttft_p95_ms == pytest.approx(100 + 0.55 * 900)


def test_ttft_fit_recovers_base_and_per_token() -> None:
    stats, _ = make()
    rng = random.Random(1)
    for _ in range(200):
        tokens = rng.randint(10, 4000)
        stats.first_token(tokens, (50 + 2 * tokens) / 1000)
    base, per_token = stats.ttft_model()
    assert base == pytest.approx(50, abs=1e-3)
    assert per_token == pytest.approx(2, abs=1e-6)
    view = stats.view(0, 0, None)
    assert view.predicted_ttft_ms(1000) == pytest.approx(2050, abs=0.01)


def test_ttft_fit_follows_a_drifting_backend() -> None:
    stats, _ = make(alpha=0.2)
    rng = random.Random(2)
    for _ in range(100):
        tokens = rng.randint(10, 4000)
        stats.first_token(tokens, (50 + 2 * tokens) / 1000)
    for _ in range(200):  # the backend got faster (a warm cache, fewer neighbours)
        tokens = rng.randint(10, 4000)
        stats.first_token(tokens, (20 + 0.5 * tokens) / 1000)
    base, per_token = stats.ttft_model()
    assert base == pytest.approx(20, abs=0.5)
    assert per_token == pytest.approx(0.5, abs=1e-3)


def test_ttft_fit_falls_back_without_x_spread() -> None:
    stats, _ = make(alpha=0.5)
    stats.first_token(500, 0.100)
    assert stats.ttft_model() == (pytest.approx(100), 0.0)  # one point: no slope yet
    stats.first_token(500, 0.200)
    stats.first_token(500, 0.300)
    base, per_token = stats.ttft_model()
    assert per_token == 0
    assert base == pytest.approx(stats.ttft.ewma)


def test_ttft_fit_clamps_a_negative_slope() -> None:
    stats, _ = make()
    for tokens in (100, 1000, 2000, 3000) * 10:  # longer prompts faster: noise, not physics
        stats.first_token(tokens, (500 - 0.1 * tokens) / 1000)
    base, per_token = stats.ttft_model()
    assert per_token == 0
    assert base is not None and 150 < base < 500  # flat at the weighted mean


def test_ttft_fit_clamps_a_negative_base() -> None:
    stats, _ = make()
    for tokens in (1000, 2000, 3000, 4000) * 10:
        stats.first_token(tokens, (2 * tokens - 500) / 1000)
    base, per_token = stats.ttft_model()
    assert base == 0
    assert 1.5 < per_token < 2  # refitted through the origin


def test_tpot_from_finished() -> None:
    stats, _ = make()
    stats.started()
    stats.finished(True, completion_tokens=11, total_s=1.5, ttft_s=0.5)
    assert stats.tpot.ewma == pytest.approx(100)  # 1000 ms over 10 tokens after the first
    assert stats.latency.ewma == pytest.approx(1500)


@pytest.mark.parametrize(
    ("ok", "completion_tokens", "total_s", "ttft_s"),
    [
        (True, 1, 1.0, 0.5),  # one token: no pace after the first
        (True, 0, 1.0, 0.5),
        (True, 10, 1.0, None),  # first token unknown
        (True, 10, None, 0.5),  # total unknown
        (True, 10, 0.5, 0.5),  # arrived in one piece (not streamed)
        (False, 10, 1.0, 0.5),  # a failure's timing is not the backend's pace
    ],
)
def test_tpot_not_recorded(
    ok: bool, completion_tokens: int, total_s: float | None, ttft_s: float | None
) -> None:
    stats, _ = make()
    stats.started()
    stats.finished(ok, completion_tokens=completion_tokens, total_s=total_s, ttft_s=ttft_s)
    assert stats.tpot.ewma is None


def test_failed_requests_do_not_feed_latency() -> None:
    stats, _ = make()
    stats.finished(False, total_s=30.0)
    assert stats.latency.ewma is None
    assert stats.samples == 1


def test_finished_never_records_ttft_first_token_does() -> None:
    stats, _ = make()
    stats.started()
    stats.first_token(100, 0.25)
    stats.finished(True, completion_tokens=5, total_s=0.9, ttft_s=0.25)
    assert list(stats.ttft.recent) == [pytest.approx(250)]
    assert stats.ttft_model()[0] == pytest.approx(250)


def test_error_rate_over_the_window() -> None:
    stats, _ = make(window=10)
    for _ in range(5):
        stats.finished(False)
    for _ in range(5):
        stats.finished(True)
    assert stats.error_rate == pytest.approx(0.5)
    for _ in range(5):  # the five failures slide out
        stats.finished(True)
    assert stats.error_rate == 0
    stats.finished(False)
    assert stats.error_rate == pytest.approx(0.1)


def test_error_rate_ages_out_old_outcomes() -> None:
    stats, clock = make(max_age_s=300)
    for _ in range(4):
        stats.finished(False)
    clock.advance(200)
    for _ in range(4):
        stats.finished(True)
    assert stats.error_rate == pytest.approx(0.5)
    clock.advance(101)  # the failures are now 301 s old, the successes 101 s
    assert stats.error_rate == 0
    assert stats.snapshot()["recent_outcomes"] == 4
    clock.advance(200)  # everything aged out: no evidence is not 100% broken
    assert stats.error_rate == 0
    assert stats.samples == 8  # the lifetime count does not age


def test_in_flight_accounting() -> None:
    stats, _ = make()
    stats.started()
    stats.started()
    stats.started()
    assert stats.in_flight == 3
    stats.finished(True)
    stats.finished(False)
    assert stats.in_flight == 1
    assert stats.view(0, 0, None).in_flight == 1
    assert stats.view(0, 0, None, in_flight=7).in_flight == 7  # the backend's own load() wins
    assert stats.view(0, 0, None, in_flight=0).in_flight == 0  # 0 is a value, not "absent"
    stats.finished(True)
    stats.finished(True)  # an unmatched finished() must not go negative
    assert stats.in_flight == 0


def test_view_fields() -> None:
    stats, _ = make(alpha=0.5)
    stats.started()
    stats.started()
    stats.first_token(100, 0.150)
    stats.finished(True, completion_tokens=21, total_s=1.150, ttft_s=0.150)
    stats.finished(False)
    stats.started()
    view = stats.view(price_in=0.5, price_out=1.5, capacity=8)
    assert isinstance(view, BackendView)
    assert view.name == "b1"
    assert view.samples == 2
    assert view.ttft_ms == pytest.approx(150)
    assert view.ttft_p50_ms == pytest.approx(150) and view.ttft_p95_ms == pytest.approx(150)
    assert view.tpot_ms == pytest.approx(50)
    assert view.ttft_base_ms == pytest.approx(150) and view.ttft_per_token_ms == 0
    assert view.error_rate == pytest.approx(0.5)
    assert view.in_flight == 1 and view.capacity == 8
    assert (view.input_per_mtok, view.output_per_mtok) == (0.5, 1.5)
    assert view.cost_usd(1_000_000, 2_000_000) == pytest.approx(0.5 + 3.0)


def test_cost_usd() -> None:
    assert cost_usd(1000, 500, input_per_mtok=3.0, output_per_mtok=15.0) == pytest.approx(0.003 + 0.0075)
    assert cost_usd(0, 0, 3.0, 15.0) == 0


def test_snapshot_is_rounded() -> None:
    stats, _ = make()
    stats.first_token(10, 0.1234567)
    stats.finished(True, completion_tokens=4, total_s=0.4567891, ttft_s=0.1234567)
    snap = stats.snapshot()
    assert snap["name"] == "b1" and snap["samples"] == 1 and snap["error_rate"] == 0
    assert snap["ttft_ms"] == 123.46
    assert snap["latency_ms"] == 456.79
    assert snap["tpot_ms"] == round((456.7891 - 123.4567) / 3, 3)


@pytest.mark.parametrize("kwargs", [{"alpha": 0}, {"alpha": 1.5}, {"window": 0}])
def test_rejects_bad_parameters(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        BackendStats("x", **kwargs)  # type: ignore[arg-type]
