"""The figures of a run, in the keys of ``vllm bench serve`` (``vllm/benchmarks/serve.py``,
https://github.com/vllm-project/vllm): ``mean_ttft_ms``, ``median_ttft_ms``, ``p99_ttft_ms``,
``request_throughput``, ``output_throughput``, ``request_goodput``..., plus what a gateway adds
(errors by class, 429s, cache hits) and what the tool knows of itself (its CPU).

``docs/bench.schema.json`` is the JSON Schema of the file ``--json`` writes.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import orjson

from gateway.loadgen.client import Record
from gateway.loadgen.runner import PointResult

PERCENTILES = (50, 90, 99)
METRICS = ("ttft", "tpot", "itl", "e2el")
SLO_KEYS = ("ttft_ms", "tpot_ms", "e2el_ms")


def parse_slo(text: str | None) -> dict[str, float]:
    """``ttft_ms=500,tpot_ms=50`` as a dict; a request meets it when it meets every bound."""
    if not text:
        return {}
    slo: dict[str, float] = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in SLO_KEYS:
            raise ValueError(f"--slo: {name!r} is not one of {', '.join(SLO_KEYS)}")
        try:
            slo[name] = float(value)
        except ValueError:
            raise ValueError(f"--slo: {name} needs a number of milliseconds, not {value!r}") from None
        if slo[name] <= 0:
            raise ValueError(f"--slo: {name} must be above 0")
    return slo


def percentile(values: Sequence[float], p: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _summary(name: str, values_s: Sequence[float]) -> dict[str, float | None]:
    values = [v * 1000 for v in values_s]
    out: dict[str, float | None] = {}
    if not values:
        for key in ("mean", "median", "std", *(f"p{p}" for p in PERCENTILES)):
            out[f"{key}_{name}_ms"] = None
        return out
    mean = sum(values) / len(values)
    out[f"mean_{name}_ms"] = mean
    out[f"median_{name}_ms"] = percentile(values, 50)
    out[f"std_{name}_ms"] = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    for p in PERCENTILES:
        out[f"p{p}_{name}_ms"] = percentile(values, p)
    return out


def meets(record: Record, slo: dict[str, float]) -> bool:
    figures = {
        "ttft_ms": record.ttft_s,
        "tpot_ms": record.tpot_s,
        "e2el_ms": record.e2e_s,
    }
    for name, bound in slo.items():
        value = figures[name]
        if value is not None and value * 1000 > bound:
            return False
    return record.ok


def point_figures(result: PointResult, slo: dict[str, float]) -> dict[str, Any]:
    records = result.records
    ok = [r for r in records if r.ok]
    duration = result.duration_s or 1e-9
    output = sum(r.output_tokens for r in ok)
    prompt = sum(r.prompt_tokens or 0 for r in ok)
    errors = Counter(r.error for r in records if r.error)
    cached = sum(1 for r in records if r.cache in ("hit", "stale"))
    user_rates = [1 / t for r in ok if (t := r.tpot_s)]
    events = sum(r.events for r in records)
    cpu = sum(result.cpu_s)
    figures: dict[str, Any] = {
        **result.plan.point,
        "duration": result.duration_s,
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "total_input_tokens": prompt,
        "total_output_tokens": output,
        "request_throughput": len(ok) / duration,
        "request_goodput": (sum(1 for r in records if meets(r, slo)) / duration) if slo else None,
        "output_throughput": output / duration,
        "total_token_throughput": (output + prompt) / duration,
        **_summary("ttft", [r.ttft_s for r in ok if r.ttft_s is not None]),
        **_summary("tpot", [t for r in ok if (t := r.tpot_s) is not None]),
        **_summary("itl", [gap for r in ok for gap in r.itl_s]),
        **_summary("e2el", [r.e2e_s for r in ok if r.e2e_s is not None]),
        "mean_user_output_throughput": sum(user_rates) / len(user_rates) if user_rates else None,
        "errors": dict(sorted(errors.items())),
        "rate_limited": errors.get("http_429", 0),
        "cache_hits": cached,
        "cache_hit_rate": cached / len(records) if records else 0.0,
        "client": {
            "workers": len(result.cpu_s),
            "cpu_s": cpu,
            "cpu_share": result.cpu_share,
            "bound": result.client_bound,
            "sse_events": events,
            "sse_events_per_cpu_s": events / cpu if cpu else None,
        },
    }
    return figures


def overhead(gateway: dict[str, Any], direct: dict[str, Any]) -> dict[str, Any]:
    """What the gateway adds, point by point: its figure minus the backend's."""
    out: dict[str, Any] = {k: gateway[k] for k in ("max_concurrency", "request_rate")}
    for key in ("median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "median_e2el_ms", "p99_e2el_ms"):
        g, d = gateway.get(key), direct.get(key)
        out[key] = None if g is None or d is None else g - d
    d_rps = direct["request_throughput"]
    out["request_throughput_ratio"] = gateway["request_throughput"] / d_rps if d_rps else None
    return out


def document(
    config: dict[str, Any], points: list[dict[str, Any]], direct: list[dict[str, Any]] | None
) -> dict[str, Any]:
    return {
        "tool": "interlock bench",
        **config,
        "points": points,
        "direct_points": direct,
        "overhead": [overhead(g, d) for g, d in zip(points, direct, strict=True)] if direct else None,
    }


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))


def write_requests(out: IO[bytes], result: PointResult, target: str) -> None:
    """One JSON line per request (``target``: gateway or direct; the point's concurrency/rate)."""
    point = result.plan.point
    for record in result.records:
        out.write(orjson.dumps({"target": target, **point, **record.to_json()}) + b"\n")


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def render(doc: dict[str, Any]) -> Any:
    """The end-of-run tables (rich): requests and throughput, then latency; each fits 80 columns."""
    from rich.console import Group
    from rich.table import Table

    mode = "rate" if doc["mode"] == "open" else "users"
    rows = [("", p) for p in doc["points"]]
    if doc.get("direct_points"):  # each gateway point beside the backend's
        rows = [
            r for pair in zip(rows, [("direct ", p) for p in doc["direct_points"]], strict=True) for r in pair
        ]

    def label(prefix: str, p: dict[str, Any]) -> str:
        key = p["request_rate"] if doc["mode"] == "open" else p["max_concurrency"]
        return f"{prefix}{key:g}" if key is not None else prefix + "trace"

    volume = Table(title=f"interlock bench: {doc['url']}", header_style="bold")
    for column in (mode, "ok", "failed", "req/s", "goodput", "tok/s", "per user", "cache", "errors"):
        volume.add_column(
            column, justify="left" if column == "errors" else "right", no_wrap=column != "errors"
        )
    latency = Table(title="latency (ms)", header_style="bold")
    for column in (mode, "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "ITL p99", "E2E p50", "E2E p99"):
        latency.add_column(column, justify="right", no_wrap=column == mode)
    for prefix, p in rows:
        volume.add_row(
            label(prefix, p),
            str(p["completed"]),
            str(p["failed"]),
            _f(p["request_throughput"], 2),
            _f(p["request_goodput"], 2),
            _f(p["output_throughput"]),
            _f(p["mean_user_output_throughput"]),
            f"{100 * p['cache_hit_rate']:.0f}%",
            ", ".join(f"{k} {v}" for k, v in p["errors"].items()) or "-",
        )
        latency.add_row(
            label(prefix, p),
            _f(p["median_ttft_ms"]),
            _f(p["p99_ttft_ms"]),
            _f(p["median_tpot_ms"], 2),
            _f(p["p99_tpot_ms"], 2),
            _f(p["p99_itl_ms"], 2),
            _f(p["median_e2el_ms"]),
            _f(p["p99_e2el_ms"]),
        )
    return Group(volume, latency)


def _point(p: dict[str, Any]) -> str:
    return (
        f"rate {p['request_rate']:g}/s" if p["request_rate"] is not None else f"{p['max_concurrency']} users"
    )


def warnings(doc: dict[str, Any]) -> list[str]:
    lines = []
    for p in [*doc["points"], *(doc.get("direct_points") or [])]:
        client = p["client"]
        if client["bound"]:
            lines.append(
                f"the load generator was CPU-bound at {_point(p)} "
                f"({100 * client['cpu_share']:.0f}% of a core in its busiest process): "
                "these figures show the tool's limit, not the target's; add --workers"
            )
    for o in doc.get("overhead") or ():
        lines.append(
            f"gateway overhead at {_point(o)}: "
            f"TTFT p50 {_f(o['median_ttft_ms'], 2)} ms, p99 {_f(o['p99_ttft_ms'], 2)} ms; "
            f"E2E p50 {_f(o['median_e2el_ms'], 2)} ms; "
            f"request throughput x{_f(o['request_throughput_ratio'], 3)}"
        )
    return lines
