"""``interlock bench``'s pure parts: lengths, workloads, traces, SLOs, percentiles, figures."""

from __future__ import annotations

import random
from pathlib import Path

import orjson
import pytest

from gateway.loadgen.client import Record
from gateway.loadgen.mock import MockSettings, parse_faults
from gateway.loadgen.report import meets, parse_slo, percentile, point_figures
from gateway.loadgen.runner import Plan, PointResult
from gateway.loadgen.workload import Length, Workload


def _bodies(workload: Workload, n: int) -> list[list[dict]]:
    sessions = workload.sessions()
    return [[orjson.loads(p.body) for p in next(sessions)] for _ in range(n)]


def test_lengths_fixed_uniform_normal() -> None:
    rng = random.Random(1)
    assert Length.parse("128").draw(rng) == 128
    uniform = Length.parse("10-20")
    draws = {uniform.draw(rng) for _ in range(500)}
    assert min(draws) == 10 and max(draws) == 20
    normal = [Length.parse("normal:100,10").draw(rng) for _ in range(2000)]
    assert 98 < sum(normal) / len(normal) < 102
    for bad in ("0", "-5", "20-10", "abc", "normal:0,3", ""):
        with pytest.raises(ValueError, match="not a length"):
            Length.parse(bad)


def test_a_single_turn_workload_streams_with_usage_and_its_lengths() -> None:
    (session,) = _bodies(Workload(model="m", prompt_len=Length(50, 50), reply_len=Length(7, 7)), 1)
    (body,) = session
    assert body["model"] == "m" and body["max_tokens"] == 7 and body["temperature"] == 0
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert len(body["messages"][0]["content"].split()) == 50


def test_sessions_carry_a_growing_history() -> None:
    (session,) = _bodies(Workload(model="m", rounds=3, prompt_len=Length(5, 5), reply_len=Length(4, 4)), 1)
    assert [len(b["messages"]) for b in session] == [1, 3, 5]
    assert session[2]["messages"][:3] == session[1]["messages"]
    assert [m["role"] for m in session[2]["messages"]] == ["user", "assistant", "user", "assistant", "user"]
    assert len(session[2]["messages"][1]["content"].split()) == 4  # a reply of the planned length


def test_a_shared_prefix_is_common_to_every_prompt_and_the_rest_differs() -> None:
    workload = Workload(model="m", prompt_len=Length(100, 100), shared_prefix=0.6)
    prompts = [s[0]["messages"][0]["content"].split() for s in _bodies(workload, 20)]
    assert all(p[:60] == prompts[0][:60] for p in prompts)
    assert len({" ".join(p[60:]) for p in prompts}) == 20
    # other workers share the prefix, not the rest
    other = orjson.loads(next(workload.sessions(worker=1))[0].body)["messages"][0]["content"].split()
    assert other[:60] == prompts[0][:60] and other[60:] != prompts[0][60:]


def test_the_repeat_ratio_repeats_that_share_of_sessions() -> None:
    bodies = [orjson.dumps(s) for s in _bodies(Workload(model="m", repeat=0.4, seed=3), 2000)]
    repeats = len(bodies) - len(set(bodies))
    assert 0.35 < repeats / len(bodies) < 0.45
    assert len({orjson.dumps(s) for s in _bodies(Workload(model="m"), 200)}) == 200


def test_completions_send_a_prompt() -> None:
    (session,) = _bodies(Workload(model="m", endpoint="completions", stream=False), 1)
    assert (
        isinstance(session[0]["prompt"], str) and "messages" not in session[0] and "stream" not in session[0]
    )


def test_a_trace_replays_sessions_in_order_with_timestamps(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    lines = [
        {"session": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "timestamp": 0},
        {"session": "b", "prompt_tokens": 12, "timestamp": 0.5},
        {"session": "a", "prompt": "and then?", "output_tokens": 5, "timestamp": 1},
    ]
    trace.write_text("\n".join(orjson.dumps(line).decode() for line in lines) + "\n\n")
    sessions = Workload(model="m", trace=trace).sessions()
    a, b, again = next(sessions), next(sessions), next(sessions)
    assert again is a  # the trace is replayed in a cycle
    assert [p.max_tokens for p in a] == [3, 5] and [p.at_s for p in a] == [0, 1]
    assert orjson.loads(a[1].body)["messages"] == [{"role": "user", "content": "and then?"}]
    assert len(orjson.loads(b[0].body)["messages"][0]["content"].split()) == 12 and b[0].at_s == 0.5


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("not json", "not JSON"),
        ("[1]", "JSON object"),
        ('{"foo": 1}', "messages, prompt or prompt_tokens"),
        ('{"prompt": "x", "max_tokens": 0}', "positive integer"),
        ('{"prompt": "x", "timestamp": "soon"}', "timestamp"),
    ],
)
def test_a_bad_trace_line_is_named(tmp_path: Path, line: str, problem: str) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=problem) as caught:
        next(Workload(model="m", trace=trace).sessions())
    assert ":2:" in str(caught.value)


def test_workload_and_plan_refuse_nonsense() -> None:
    for kwargs in ({"shared_prefix": 1.0}, {"repeat": -0.1}, {"rounds": 0}, {"endpoint": "embeddings"}):
        with pytest.raises(ValueError):
            Workload(model="m", **kwargs)  # type: ignore[arg-type]
    w = Workload(model="m")
    with pytest.raises(ValueError, match="one of them"):
        Plan("http://x/v1", w, concurrency=2, rate=1.0, requests=1)
    with pytest.raises(ValueError, match="duration or a number"):
        Plan("http://x/v1", w, concurrency=2)
    with pytest.raises(ValueError, match="above 0"):
        Plan("http://x/v1", w, rate=0, requests=1)


def test_a_plan_splits_over_workers() -> None:
    plan = Plan("http://x/v1", Workload(model="m"), concurrency=5, requests=11, workers=3)
    shares = [plan.share(i) for i in range(3)]
    assert [s.concurrency for s in shares] == [2, 2, 1] and sum(s.requests or 0 for s in shares) == 11
    open_plan = Plan("http://x/v1", Workload(model="m"), rate=9.0, duration_s=1, workers=3)
    assert [s.rate for s in (open_plan.share(i) for i in range(3))] == [3.0, 3.0, 3.0]


def test_slo_parsing_and_goodput() -> None:
    assert parse_slo("ttft_ms=500, tpot_ms=50") == {"ttft_ms": 500, "tpot_ms": 50}
    assert parse_slo(None) == {}
    for bad, problem in (("ttfb=3", "not one of"), ("ttft_ms=fast", "number"), ("tpot_ms=0", "above 0")):
        with pytest.raises(ValueError, match=problem):
            parse_slo(bad)
    fast = Record("s", 0, 0, ok=True, ttft_s=0.1, e2e_s=1.0, output_tokens=10)  # TPOT 100 ms
    assert meets(fast, {"ttft_ms": 200}) and not meets(fast, {"tpot_ms": 50})
    assert not meets(Record("s", 0, 0, ok=False, error="http_500"), {"ttft_ms": 1e9})


def test_percentiles_interpolate_as_numpy_does() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([10], 99) == 10
    assert percentile(list(range(101)), 90) == 90


def test_figures_of_a_point() -> None:
    plan = Plan("http://x/v1", Workload(model="m"), concurrency=2, requests=4)
    records = [
        Record(
            "a",
            0,
            0,
            ok=True,
            ttft_s=0.2,
            e2e_s=0.4,
            itl_s=[0.1, 0.1],
            output_tokens=3,
            prompt_tokens=10,
            events=5,
            cache="miss",
        ),
        Record("b", 0, 0, ok=True, ttft_s=0.001, e2e_s=0.002, output_tokens=3, prompt_tokens=10, cache="hit"),
        Record("c", 0, 0, error="http_429", retry_after="1"),
        Record("d", 0, 0, error="stream_cut"),
    ]
    figures = point_figures(PointResult(plan, records, 2.0, [0.5]), {"ttft_ms": 100})
    assert (figures["completed"], figures["failed"], figures["max_concurrency"]) == (2, 2, 2)
    assert figures["errors"] == {"http_429": 1, "stream_cut": 1} and figures["rate_limited"] == 1
    assert figures["cache_hits"] == 1 and figures["cache_hit_rate"] == 0.25
    assert figures["request_throughput"] == 1.0 and figures["request_goodput"] == 0.5
    assert figures["output_throughput"] == 3.0 and figures["total_input_tokens"] == 20
    assert figures["mean_tpot_ms"] == pytest.approx((100 + 0.5) / 2)
    assert figures["median_itl_ms"] == pytest.approx(100)
    assert figures["client"]["cpu_share"] == 0.25 and not figures["client"]["bound"]


def test_mock_settings_refuse_nonsense() -> None:
    assert parse_faults("5xx=0.1, cut=0.2") == {"5xx": 0.1, "cut": 0.2}
    with pytest.raises(ValueError, match="probability"):
        parse_faults("5xx=often")
    with pytest.raises(ValueError, match="unknown fault"):
        MockSettings(faults={"fire": 0.1})
    with pytest.raises(ValueError, match="add up"):
        MockSettings(faults={"5xx": 0.6, "cut": 0.6})
    with pytest.raises(ValueError):
        MockSettings(chunk_tokens=0)


def test_the_bench_says_when_it_was_the_bottleneck() -> None:
    from gateway.loadgen.report import document, warnings

    plan = Plan("http://x/v1", Workload(model="m"), concurrency=64, requests=4)
    done = [Record("a", 0, 0, ok=True, ttft_s=0.1, e2e_s=0.2, output_tokens=3)]
    busy = point_figures(PointResult(plan, done, 2.0, [1.9]), {})
    idle = point_figures(PointResult(plan, done, 2.0, [0.3]), {})
    assert busy["client"]["bound"] and not idle["client"]["bound"]
    (line,) = warnings(document({"mode": "closed"}, [busy], None))
    assert "CPU-bound at 64 users (95% of a core" in line and "--workers" in line
    assert warnings(document({"mode": "closed"}, [idle], None)) == []
