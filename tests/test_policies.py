"""Routing policies as table tests: fixed snapshots in, exact order (and reasons) out."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest

from policies import POLICIES, balanced, cost, latency, least_busy, ordered, slo, weighted
from policies.base import MIN_SAMPLES, BackendView, Policy, PolicyContext, PolicyOptions, Ranked, RequestFacts

DATA_POLICIES = {"cost": cost.rank, "latency": latency.rank, "balanced": balanced.rank, "slo": slo.rank}
REQ = RequestFacts(prompt_tokens=1000, max_tokens=100)


def warm(name: str, **kw: Any) -> BackendView:
    """A backend with enough samples that its figures are trusted (no exploring)."""
    kw.setdefault("samples", 50)
    return BackendView(name=name, **kw)


def cold(name: str, **kw: Any) -> BackendView:
    kw.setdefault("samples", 0)
    assert kw["samples"] < MIN_SAMPLES
    return BackendView(name=name, **kw)


def ctx(seed: int = 0, **options: Any) -> PolicyContext:
    return PolicyContext(rng=random.Random(seed), options=PolicyOptions(**options))


def names(ranked: Sequence[Ranked]) -> list[str]:
    return [r.name for r in ranked]


def run(
    policy: Policy, cands: Sequence[BackendView], req: RequestFacts = REQ, seed: int = 0, **kw: Any
) -> list[Ranked]:
    out = policy(cands, req, ctx(seed, **kw))
    assert_well_formed(cands, out)
    return out


def assert_well_formed(cands: Sequence[BackendView], out: Sequence[Ranked]) -> None:
    assert sorted(names(out)) == sorted(c.name for c in cands), "every candidate exactly once"
    for r in out:
        assert r.reason and r.reason.isascii(), r
        assert "\n" not in r.reason and "\r" not in r.reason, r
        assert len(r.reason) <= 120, r


# --- the registry and the contract every policy keeps ------------------------------------


def test_registry_names() -> None:
    assert set(POLICIES) == {"ordered", "weighted", "least_busy", "cost", "latency", "balanced", "slo"}
    assert POLICIES["ordered"] is ordered.rank and POLICIES["slo"] is slo.rank


MIXED = [
    warm(
        "fast-dear",
        ttft_ms=120.0,
        tpot_ms=5.0,
        input_per_mtok=10,
        output_per_mtok=30,
        capacity=4,
        in_flight=3,
    ),
    warm("slow-free", ttft_base_ms=900.0, ttft_per_token_ms=0.5, tpot_ms=40.0, in_flight=1),
    warm("flaky", ttft_ms=80.0, error_rate=0.9, input_per_mtok=1, output_per_mtok=1),
    cold("new", samples=1, ttft_ms=300.0, input_per_mtok=2, output_per_mtok=2),
    cold("new-busy", in_flight=2, capacity=2),
    warm("no-data", input_per_mtok=0.1, output_per_mtok=0.1, capacity=0),
]
SCENARIOS = {
    "empty": [],
    "one": [warm("only", ttft_ms=100.0)],
    "one-cold": [cold("only")],
    "mixed": MIXED,
    "all-cold": [cold("x"), cold("y", samples=2), cold("z", in_flight=1)],
    "all-unknown-free": [warm("p"), warm("q"), warm("r", error_rate=0.5)],
}


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("req", [REQ, RequestFacts(10, 1, ttft_budget_ms=200.0), RequestFacts(0, 0, 0.0)])
def test_every_candidate_once_with_clean_reasons(policy: str, scenario: str, req: RequestFacts) -> None:
    for seed in range(5):
        run(POLICIES[policy], SCENARIOS[scenario], req, seed=seed)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_same_seed_same_order(policy: str) -> None:
    results = {tuple(run(POLICIES[policy], MIXED, seed=seed)) for seed in (7, 7, 7)}
    assert len(results) == 1


# --- ordered ---------------------------------------------------------------------------


def test_ordered_keeps_target_order() -> None:
    out = run(ordered.rank, [warm("b"), warm("a", ttft_ms=1.0), warm("c", error_rate=1.0)])
    assert out == [
        Ranked("b", "position 1 in targets"),
        Ranked("a", "position 2 in targets"),
        Ranked("c", "position 3 in targets"),
    ]


# --- weighted --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weights", "expected_share"),
    [
        ({"a": 1, "b": 3, "z": 0}, {"a": 0.25, "b": 0.75}),
        ({"a": 1, "b": 1, "c": 2}, {"a": 0.25, "b": 0.25, "c": 0.5}),
        ({"a": 0.001, "b": 0.001}, {"a": 0.5, "b": 0.5}),  # tiny weights must not underflow into a bias
    ],
)
def test_weighted_first_place_share(weights: dict[str, float], expected_share: dict[str, float]) -> None:
    cands = [warm(n) for n in weights]
    context = ctx(1234, weights=weights)
    firsts: Counter[str] = Counter()
    for _ in range(2000):
        out = weighted.rank(cands, REQ, context)
        assert_well_formed(cands, out)
        firsts[out[0].name] += 1
        assert all(weights[n] > 0 for n in names(out)[: len(expected_share)])  # zero weights last
    for n, share in expected_share.items():
        assert abs(firsts[n] / 2000 - share) < 0.04, (n, firsts)
    assert set(firsts) == set(expected_share)


def test_weighted_non_positive_weights_listed_last_in_target_order() -> None:
    weights = {"off": 0.0, "on": 2.0, "neg": -1.0, "on2": 1.0}
    cands = [warm(n) for n in weights]
    for seed in range(50):
        out = run(weighted.rank, cands, seed=seed, weights=weights)
        assert names(out)[2:] == ["off", "neg"]
        assert out[2].reason == "weight 0: listed last"
    all_off = [warm("x"), warm("y")]
    assert names(run(weighted.rank, all_off, weights={"x": 0, "y": 0})) == ["x", "y"]


def test_weighted_is_without_replacement() -> None:
    # With one dominant weight the rest still get drawn, each once, in weight-biased order.
    cands = [warm("a"), warm("b"), warm("c")]
    weights = {"a": 100.0, "b": 10.0, "c": 1.0}
    orders = Counter(tuple(names(run(weighted.rank, cands, seed=s, weights=weights))) for s in range(300))
    assert orders.most_common(1)[0][0] == ("a", "b", "c")


# --- least_busy ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cands", "expected"),
    [
        (
            [warm("a", in_flight=4, capacity=8), warm("b", in_flight=1, capacity=1), warm("c", in_flight=0)],
            ["c", "a", "b"],
        ),
        ([warm("d", in_flight=2, capacity=0), warm("e", in_flight=3, capacity=4)], ["e", "d"]),  # 0 = unknown
        (
            [warm("f", in_flight=5), warm("g", in_flight=2), warm("h", in_flight=9, capacity=10)],
            ["h", "g", "f"],
        ),
    ],
)
def test_least_busy_order(cands: list[BackendView], expected: list[str]) -> None:
    out = run(least_busy.rank, cands)
    assert names(out) == expected
    assert out[0].reason.startswith("least busy: ")


def test_least_busy_reasons() -> None:
    out = run(least_busy.rank, [warm("a", in_flight=2, capacity=8), warm("b", in_flight=3)])
    assert out == [Ranked("a", "least busy: 2/8 in flight"), Ranked("b", "3 in flight, capacity unknown")]


def test_least_busy_ties_broken_both_ways() -> None:
    cands = [warm("a", in_flight=1, capacity=2), warm("b", in_flight=2, capacity=4), warm("c", in_flight=3)]
    context = ctx(99)
    orders = Counter(tuple(names(least_busy.rank(cands, REQ, context))) for _ in range(200))
    assert set(orders) == {("a", "b", "c"), ("b", "a", "c")}
    assert min(orders.values()) > 60  # roughly even, not merely "happened once"


# --- cost ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cands", "req", "expected"),
    [
        pytest.param(
            [
                warm("a", input_per_mtok=1, output_per_mtok=2),
                warm("b", input_per_mtok=0.5, output_per_mtok=0.5),
                warm("c", input_per_mtok=3, output_per_mtok=3),
            ],
            REQ,
            ["b", "a", "c"],
            id="cheapest-first",
        ),
        pytest.param(
            [warm("a", input_per_mtok=1, ttft_ms=500.0), warm("b", input_per_mtok=1, ttft_ms=200.0)],
            REQ,
            ["b", "a"],
            id="tie-by-latency",
        ),
        pytest.param(
            [
                warm("a", error_rate=0.6),
                warm("b", input_per_mtok=9),
                warm("c", input_per_mtok=5, error_rate=0.49),
            ],
            REQ,
            ["c", "b", "a"],
            id="error-demotion",
        ),
        pytest.param(
            [warm("a", error_rate=0.5), warm("b", input_per_mtok=9)],
            REQ,
            ["b", "a"],
            id="half-errors-demoted",
        ),
        # prompt-heavy request: cheap input wins; output-heavy: cheap output wins
        pytest.param(
            [
                warm("a", input_per_mtok=0.1, output_per_mtok=10),
                warm("b", input_per_mtok=5, output_per_mtok=0.5),
            ],
            RequestFacts(10_000, 10),
            ["a", "b"],
            id="long-prompt",
        ),
        pytest.param(
            [
                warm("a", input_per_mtok=0.1, output_per_mtok=10),
                warm("b", input_per_mtok=5, output_per_mtok=0.5),
            ],
            RequestFacts(10, 2000),
            ["b", "a"],
            id="long-reply",
        ),
        # cold but busy: not explored, placed by price like anyone else
        pytest.param(
            [warm("a", input_per_mtok=1), cold("n", samples=1, in_flight=1), warm("b", input_per_mtok=2)],
            REQ,
            ["n", "a", "b"],
            id="cold-in-flight-by-price",
        ),
    ],
)
def test_cost_order(cands: list[BackendView], req: RequestFacts, expected: list[str]) -> None:
    assert names(run(cost.rank, cands, req)) == expected


def test_cost_reasons() -> None:
    cands = [
        warm("a", input_per_mtok=0.1, output_per_mtok=0.2),
        warm("b", input_per_mtok=3),
        warm("c", error_rate=0.75),
    ]
    assert run(cost.rank, cands) == [
        Ranked("a", "cheapest healthy: $0.12/1k req est."),
        Ranked("b", "$3.00/1k req est."),
        Ranked("c", "error rate 75% (demoted): $0/1k req est."),
    ]


# --- latency ---------------------------------------------------------------------------

# low base but steep per-token TTFT: wins short prompts, loses long ones
STEEP = warm("steep", ttft_base_ms=100.0, ttft_per_token_ms=1.0)
FLAT = warm("flat", ttft_base_ms=300.0, ttft_per_token_ms=0.01)


@pytest.mark.parametrize(
    ("cands", "req", "expected"),
    [
        pytest.param([FLAT, STEEP], RequestFacts(50, 1), ["steep", "flat"], id="short-prompt"),
        pytest.param([STEEP, FLAT], RequestFacts(2000, 1), ["flat", "steep"], id="long-prompt"),
        pytest.param(
            [warm("a", ttft_ms=100.0, tpot_ms=50.0), warm("b", ttft_ms=300.0, tpot_ms=10.0)],
            RequestFacts(10, 1),
            ["a", "b"],
            id="one-token-reply",
        ),
        pytest.param(
            [warm("a", ttft_ms=100.0, tpot_ms=50.0), warm("b", ttft_ms=300.0, tpot_ms=10.0)],
            RequestFacts(10, 101),
            ["b", "a"],
            id="long-reply",
        ),
        pytest.param(
            [warm("a", ttft_ms=100.0, error_rate=0.9), warm("b", ttft_ms=500.0), warm("c", ttft_ms=300.0)],
            REQ,
            ["c", "b", "a"],
            id="error-demotion",
        ),
        pytest.param(
            [warm("a", ttft_ms=200.0, input_per_mtok=5), warm("b", ttft_ms=200.0, input_per_mtok=1)],
            REQ,
            ["b", "a"],
            id="tie-by-cost",
        ),
        # a busy cold backend counts as the best known figure (200ms): ties with a, cheaper
        pytest.param(
            [
                warm("a", ttft_ms=200.0, input_per_mtok=1),
                warm("b", ttft_ms=400.0),
                cold("n", samples=2, in_flight=1),
            ],
            REQ,
            ["n", "a", "b"],
            id="cold-busy-optimistic-cheap",
        ),
        pytest.param(
            [
                warm("a", ttft_ms=200.0),
                warm("b", ttft_ms=400.0),
                cold("n", samples=2, in_flight=1, input_per_mtok=10),
            ],
            REQ,
            ["a", "n", "b"],
            id="cold-busy-optimistic-dear",
        ),
    ],
)
def test_latency_order(cands: list[BackendView], req: RequestFacts, expected: list[str]) -> None:
    assert names(run(latency.rank, cands, req)) == expected


def test_latency_reasons() -> None:
    cands = [
        warm("a", ttft_ms=200.0, tpot_ms=2.0),
        warm("b", ttft_ms=400.0),
        warm("f", ttft_ms=50.0, error_rate=1),
    ]
    assert run(latency.rank, cands, RequestFacts(10, 11)) == [
        Ranked("a", "fastest: predicted 220ms"),
        Ranked("b", "predicted 400ms"),
        Ranked("f", "error rate 100% (demoted), predicted 50ms"),
    ]


def test_latency_unknown_counts_as_best_known() -> None:
    cands = [warm("a", ttft_ms=200.0, tpot_ms=2.0), cold("n", in_flight=1, input_per_mtok=1)]
    out = run(latency.rank, cands, RequestFacts(10, 11))
    assert out == [Ranked("a", "fastest: predicted 220ms"), Ranked("n", "no data, assumed 220ms")]


# --- balanced --------------------------------------------------------------------------

# latency 1000/250/500 ms -> ratios 4/1/2; cost 0 / $1.1e-3 / $0.55e-3 per request; the cheapest
# (0) is floored at 10% of the dearest, so cost ratios are 0 / 10 / 5.
FREE_SLOW = warm("free-slow", ttft_ms=1000.0)
DEAR_FAST = warm("dear-fast", ttft_ms=250.0, input_per_mtok=1, output_per_mtok=1)
MID = warm("mid", ttft_ms=500.0, input_per_mtok=0.5, output_per_mtok=0.5)


@pytest.mark.parametrize(
    ("w", "expected"),
    [
        (0.0, ["free-slow", "mid", "dear-fast"]),  # cost only
        (0.5, ["free-slow", "mid", "dear-fast"]),  # 2.0 / 3.5 / 5.5
        (0.8, ["mid", "dear-fast", "free-slow"]),  # 2.6 / 2.8 / 3.2
        (0.9, ["dear-fast", "mid", "free-slow"]),  # 1.9 / 2.3 / 3.6
        (1.0, ["dear-fast", "mid", "free-slow"]),  # latency only
    ],
)
def test_balanced_weight_moves_the_winner(w: float, expected: list[str]) -> None:
    assert names(run(balanced.rank, [FREE_SLOW, DEAR_FAST, MID], latency_weight=w)) == expected


def test_balanced_all_free_and_reasons() -> None:
    cands = [warm("a", ttft_ms=1000.0), warm("b", ttft_ms=250.0)]
    out = run(balanced.rank, cands, latency_weight=0.2)
    assert out == [
        Ranked("b", "score 0.20 (w=0.2): 250ms = 1.0x best, $0/1k req = 0.0x"),
        Ranked("a", "score 0.80 (w=0.2): 1000ms = 4.0x best, $0/1k req = 0.0x"),
    ]


def test_balanced_error_demotion() -> None:
    flaky = warm("dear-fast", ttft_ms=250.0, input_per_mtok=1, output_per_mtok=1, error_rate=0.5)
    out = run(balanced.rank, [FREE_SLOW, flaky, MID], latency_weight=1.0)
    assert names(out) == ["mid", "free-slow", "dear-fast"]
    assert out[-1].reason.startswith("error rate 50% (demoted), score 1.00")


# --- slo -------------------------------------------------------------------------------

SLO_A = warm("a", ttft_ms=300.0, input_per_mtok=5, output_per_mtok=5)  # meets 800, dear
SLO_B = warm("b", ttft_ms=600.0, input_per_mtok=1, output_per_mtok=1)  # meets 800, cheaper
SLO_C = warm("c", ttft_ms=2000.0, input_per_mtok=0.1, output_per_mtok=0.1)  # misses, cheapest
SLO_D = warm("d", ttft_ms=1000.0, input_per_mtok=0.1, output_per_mtok=0.1)  # misses, cheapest
SLO_ALL = [SLO_A, SLO_B, SLO_C, SLO_D]


def budget(ms: float | None, prompt: int = 1000, max_tokens: int = 100) -> RequestFacts:
    return RequestFacts(prompt, max_tokens, ttft_budget_ms=ms)


@pytest.mark.parametrize(
    ("cands", "req", "expected"),
    [
        pytest.param(SLO_ALL, budget(800), ["b", "a", "d", "c"], id="cheapest-meeting-then-fastest-missing"),
        pytest.param(SLO_ALL, budget(200), ["a", "b", "d", "c"], id="none-meets"),
        pytest.param(SLO_ALL, budget(None), ["d", "c", "b", "a"], id="no-budget-is-cost"),
        pytest.param(
            [warm("e", ttft_ms=400.0, tpot_ms=10.0), warm("f", ttft_ms=400.0, tpot_ms=1.0)],
            budget(800),
            ["f", "e"],
            id="meeting-tie-by-latency",
        ),
        pytest.param(
            [SLO_A, warm("b", ttft_ms=600.0, error_rate=0.7), SLO_C, SLO_D],
            budget(800),
            ["a", "d", "c", "b"],
            id="error-demotion",
        ),
        # steep per-token TTFT: meets with a short prompt (600ms), misses with a long one (1100ms)
        pytest.param(
            [
                warm("s", ttft_base_ms=100.0, ttft_per_token_ms=1.0),
                warm("x", ttft_ms=400.0, input_per_mtok=9),
            ],
            budget(800, prompt=500),
            ["s", "x"],
            id="short-prompt-meets",
        ),
        pytest.param(
            [
                warm("s", ttft_base_ms=100.0, ttft_per_token_ms=1.0),
                warm("x", ttft_ms=400.0, input_per_mtok=9),
            ],
            budget(800, prompt=1000),
            ["x", "s"],
            id="long-prompt-misses",
        ),
    ],
)
def test_slo_order(cands: list[BackendView], req: RequestFacts, expected: list[str]) -> None:
    assert names(run(slo.rank, cands, req)) == expected


def test_slo_reasons_when_some_meet() -> None:
    assert run(slo.rank, SLO_ALL, budget(800)) == [
        Ranked("b", "predicted ttft 600ms <= budget 800ms, cheapest such"),
        Ranked("a", "predicted ttft 300ms <= budget 800ms, $5.50/1k req est."),
        Ranked("d", "predicted ttft 1000ms > budget 800ms"),
        Ranked("c", "predicted ttft 2000ms > budget 800ms"),
    ]


def test_slo_reasons_when_none_meet() -> None:
    out = run(slo.rank, SLO_ALL, budget(200))
    assert out[0] == Ranked("a", "none predicted to meet 200ms: fastest first, predicted ttft 300ms")
    assert out[1] == Ranked("b", "predicted ttft 600ms > budget 200ms")


def test_slo_without_budget_matches_cost() -> None:
    cands = [*SLO_ALL, cold("n")]
    for seed in range(10):
        assert run(slo.rank, cands, budget(None), seed=seed) == run(cost.rank, cands, budget(None), seed=seed)


def test_slo_cold_busy_assumed_best_ttft() -> None:
    cands = [*SLO_ALL, cold("n", samples=1, in_flight=1)]  # free, unknown: assumed 300ms, meets
    out = run(slo.rank, cands, budget(800))
    assert out[0] == Ranked("n", "predicted ttft 300ms (assumed) <= budget 800ms, cheapest such")
    assert names(out)[1:] == ["b", "a", "d", "c"]


# --- cold start (cost, latency, balanced, slo) ------------------------------------------

WARM_PAIR = [warm("a", ttft_ms=100.0), warm("b", ttft_ms=200.0, input_per_mtok=1)]
COLD_REQ = budget(800)


@pytest.mark.parametrize("policy", sorted(DATA_POLICIES))
def test_cold_idle_backend_is_explored_first(policy: str) -> None:
    # "x" is the slowest and dearest by every figure it has, and still goes first
    cands = [*WARM_PAIR, cold("x", samples=1, ttft_ms=5000.0, input_per_mtok=50)]
    for seed in range(20):
        out = run(DATA_POLICIES[policy], cands, COLD_REQ, seed=seed)
        assert out[0] == Ranked("x", "exploring: 1 sample")
        assert names(out)[1:] == ["a", "b"]
        assert sum(r.reason.startswith("exploring") for r in out) == 1


@pytest.mark.parametrize("policy", sorted(DATA_POLICIES))
def test_at_most_one_explorer_chosen_at_random(policy: str) -> None:
    cands = [*WARM_PAIR, cold("x"), cold("y", samples=2)]
    firsts: Counter[str] = Counter()
    for seed in range(60):
        out = run(DATA_POLICIES[policy], cands, COLD_REQ, seed=seed)
        assert sum(r.reason.startswith("exploring") for r in out) == 1
        assert out[0].reason in ("exploring: 0 samples", "exploring: 2 samples")
        firsts[out[0].name] += 1
    assert set(firsts) == {"x", "y"} and min(firsts.values()) > 10


@pytest.mark.parametrize("policy", sorted(DATA_POLICIES))
def test_cold_backend_with_request_in_flight_is_not_explored(policy: str) -> None:
    # optimistic figures: "x" counts as 100ms (best known) and free, so it beats "b" by every rule
    cands = [
        warm("b", ttft_ms=200.0, input_per_mtok=1),
        cold("x", in_flight=1),
        warm("a", ttft_ms=100.0, input_per_mtok=1),
    ]
    for seed in range(10):
        out = run(DATA_POLICIES[policy], cands, COLD_REQ, seed=seed)
        assert not any(r.reason.startswith("exploring") for r in out)
        assert names(out)[-1] == "b"


@pytest.mark.parametrize("policy", sorted(DATA_POLICIES))
def test_cold_failing_backend_is_demoted_not_explored(policy: str) -> None:
    cands = [cold("x", samples=2, error_rate=1.0), *WARM_PAIR]
    for seed in range(10):
        out = run(DATA_POLICIES[policy], cands, COLD_REQ, seed=seed)
        assert names(out) == ["a", "b", "x"]
        assert out[-1].reason.startswith("error rate 100% (demoted)")


@pytest.mark.parametrize("policy", sorted(DATA_POLICIES))
def test_backend_at_min_samples_is_not_cold(policy: str) -> None:
    cands = [*WARM_PAIR, warm("x", samples=MIN_SAMPLES, ttft_ms=5000.0, input_per_mtok=50)]
    assert names(run(DATA_POLICIES[policy], cands, COLD_REQ)) == ["a", "b", "x"]


@pytest.mark.parametrize("policy", sorted(DATA_POLICIES))
def test_one_failure_is_no_verdict(policy: str) -> None:
    # 1 failure in 2 tries: still explored (listed first), not demoted for a 50% error rate
    cands = [cold("x", samples=2, error_rate=0.5), *WARM_PAIR]
    out = run(DATA_POLICIES[policy], cands, COLD_REQ, seed=0)
    assert names(out)[0] == "x"
    assert out[0].reason.startswith("exploring")
