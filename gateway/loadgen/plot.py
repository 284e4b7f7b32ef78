"""The throughput cliff as a PNG: per-user tokens/s (and the total) and TTFT against concurrency or
rate. Needs matplotlib: ``pip install 'interlock[bench]'``."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class PlotUnavailable(RuntimeError):
    pass


def plot(doc: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display; the file is the product
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("--plot needs matplotlib: pip install 'interlock[bench]'") from None

    open_loop = doc["mode"] == "open" and doc["arrivals"] != "trace"  # a replay's x: its cap
    axis = "request_rate" if open_loop else "max_concurrency"
    label = "request rate (req/s)" if open_loop else "concurrent users"
    series = [("gateway" if doc.get("direct_points") else "target", doc["points"], "-")]
    if doc.get("direct_points"):
        series.append(("direct", doc["direct_points"], "--"))

    fig, (speed, ttft) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=80)
    total = speed.twinx()
    for name, points, style in series:
        xs = [p[axis] for p in points]
        speed.plot(
            xs,
            [p["mean_user_output_throughput"] for p in points],
            style,
            marker="o",
            color="tab:blue",
            label=f"{name}: per user",
        )
        total.plot(
            xs,
            [p["output_throughput"] for p in points],
            style,
            marker="s",
            color="tab:gray",
            label=f"{name}: total",
        )
        ttft.plot(
            xs,
            [p["median_ttft_ms"] for p in points],
            style,
            marker="o",
            color="tab:orange",
            label=f"{name}: p50",
        )
        ttft.plot(
            xs, [p["p99_ttft_ms"] for p in points], style, marker="^", color="tab:red", label=f"{name}: p99"
        )
    speed.set_xlabel(label)
    speed.set_ylabel("tokens/s per user", color="tab:blue")
    total.set_ylabel("tokens/s, all users", color="tab:gray")
    for ax in (speed, total, ttft):
        ax.set_ylim(0, ax.get_ylim()[1] * 1.12)  # from zero, with room above the top marker
    lines = speed.get_legend_handles_labels()
    more = total.get_legend_handles_labels()
    speed.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="center left")
    speed.set_title("output speed", fontsize=10)
    ttft.set_xlabel(label)
    ttft.set_ylabel("time to first token (ms)")
    ttft.legend(fontsize=7, loc="upper left")
    ttft.set_title("time to first token", fontsize=10)
    for ax in (speed, ttft):
        xs = sorted({p[axis] for p in doc["points"] if p[axis] is not None})
        if not open_loop and len(xs) > 2:
            ax.set_xscale("log", base=2)
        if xs:
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"interlock bench: {doc['endpoint']}, {'streaming' if doc['stream'] else 'not streaming'}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
