"""bench.py's records and report: what each request and run measured, the medians over the
passes, the issue's targets and the raw-decoding ceilings, as the markdown of results.md."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shlex
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import git_commit, percentile  # bench.py puts the repository root on sys.path

REPO = Path(__file__).resolve().parent.parent.parent


@dataclass(slots=True)
class Request:
    """One streamed completion as the client saw it."""

    user: int
    #: the user's how-many-th request (0: the opening burst, when every user sends at once)
    round_: int = 0
    tokens: int = 0  # content chunks with non-empty text
    ttft: float | None = None  # seconds from send to the first non-empty content delta
    #: seconds from send to the first SSE ``data:`` line of any kind (a role-only chunk counts):
    #: shows a server that answers at once and only then prefills
    ttfb: float | None = None
    total: float = 0.0  # seconds from send to the end of the stream
    ok: bool = False  # finish_reason seen and the stream ended with [DONE]
    error: str = ""


@dataclass(slots=True)
class Run:
    """One measured run: ``users`` x ``rounds`` requests against one server."""

    server: str
    users: int
    rounds: int
    requests: list[Request] = field(default_factory=list)
    wall: float = 0.0
    note: str = ""  # set instead of measurements, e.g. "not built"
    #: which pass over the servers made it (``--passes``)
    pass_: int = 1
    #: CPU used by processes other than this one and the server measured, in cores, averaged
    #: over the run: other people's work on a shared machine that the numbers include
    foreign: float = 0.0

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.requests)

    @property
    def dropped(self) -> int:
        return sum(not r.ok for r in self.requests)

    @property
    def aggregate(self) -> float:
        return self.tokens / self.wall if self.wall else 0.0

    @property
    def per_user(self) -> float:
        """Median over users of (tokens received / time spent in requests)."""
        rates = []
        for u in range(self.users):
            mine = [r for r in self.requests if r.user == u]
            busy = sum(r.total for r in mine)
            if busy:
                rates.append(sum(r.tokens for r in mine) / busy)
        return statistics.median(rates) if rates else 0.0

    def ttft(self, q: float, *, after_round_1: bool = False) -> float | None:
        return percentile(
            [r.ttft for r in self.requests if r.ttft is not None and (r.round_ > 0 or not after_round_1)],
            q,
            method="nearest",
        )

    def ttfb(self, q: float) -> float | None:
        return percentile([r.ttfb for r in self.requests if r.ttfb is not None], q, method="nearest")


def _extra_note(extra: dict[str, Any]) -> str:
    """What --extra-body changes in every request, for the workload line."""
    return f" (overridden for the servers by {json.dumps(extra)})" if extra else ""


def ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f}"


@dataclass(slots=True)
class Summary:
    """A server and user count over every pass: medians of the runs' figures."""

    server: str
    users: int
    runs: int
    aggregate: float
    per_user: float
    ttft_p50: float | None
    ttft_p95: float | None
    #: TTFT p50 of the requests after each user's first: the steady state, without the opening
    #: burst in which every user's first prompt arrives at once
    ttft_p50_later: float | None
    ttfb_p50: float | None
    dropped: int
    requests: int


def summarize(runs: list[Run]) -> list[Summary]:
    keys = list(dict.fromkeys((r.server, r.users) for r in runs if not r.note))
    out = []
    for server, users in keys:
        mine = [r for r in runs if r.server == server and r.users == users and not r.note]

        def med(values: list[float | None]) -> float | None:
            present = [v for v in values if v is not None]
            return statistics.median(present) if present else None

        out.append(
            Summary(
                server,
                users,
                len(mine),
                statistics.median(r.aggregate for r in mine),
                statistics.median(r.per_user for r in mine),
                med([r.ttft(0.5) for r in mine]),
                med([r.ttft(0.95) for r in mine]),
                med([r.ttft(0.5, after_round_1=True) for r in mine]),
                med([r.ttfb(0.5) for r in mine]),
                sum(r.dropped for r in mine),
                sum(len(r.requests) for r in mine),
            )
        )
    return out


def summary_table(rows: list[Summary]) -> str:
    lines = [
        "| server | users | runs | aggregate tok/s | per-user tok/s | TTFT p50 ms | TTFT p95 ms "
        "| TTFT p50 after round 1 | first byte p50 ms | dropped |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in rows:
        later = ms(s.ttft_p50_later) if s.users > 1 else "-"
        lines.append(
            f"| {s.server} | {s.users} | {s.runs} | {s.aggregate:.1f} | {s.per_user:.1f} "
            f"| {ms(s.ttft_p50)} | {ms(s.ttft_p95)} | {later} | {ms(s.ttfb_p50)} "
            f"| {s.dropped}/{s.requests} |"
        )
    return "\n".join(lines)


def table(runs: list[Run]) -> str:
    rows = [
        "| pass | server | users x rounds | tokens (mean/reply) | wall s | aggregate tok/s "
        "| per-user tok/s (median) | TTFT p50 ms | TTFT p95 ms | first byte p50 ms | dropped "
        "| other load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        shape = f"{r.users} x {r.rounds}"
        if r.note:
            rows.append(f"| {r.pass_} | {r.server} | {shape} | {r.note} | | | | | | | | |")
            continue
        n = len(r.requests)
        rows.append(
            f"| {r.pass_} | {r.server} | {shape} | {r.tokens} ({r.tokens / n:.1f}) | {r.wall:.2f} "
            f"| {r.aggregate:.1f} | {r.per_user:.1f} | {ms(r.ttft(0.5))} | {ms(r.ttft(0.95))} "
            f"| {ms(r.ttfb(0.5))} "
            f"| {r.dropped}/{n} | {r.foreign:.2f} |"
        )
    return "\n".join(rows)


def find(rows: list[Summary], server: str, users: int) -> Summary | None:
    return next((r for r in rows if r.server == server and r.users == users), None)


#: prompt tokens a reply prefills when the server reuses the cached prefix: prompt_for's chats are
#: 59-63 tokens with SmolLM2's template, of which 29-30 (system prompt and "Write a long story
#: about") match the previous prompt
NEW_PROMPT_TOKENS = 30


def ceiling(
    raws: list[list[dict[str, float]]], rows_: list[Summary], users: int, max_tokens: int
) -> list[str]:
    """The raw decode rates, medians over the passes that measured them."""
    raws = [r for r in raws if r]
    if not raws:
        return []
    raw = [
        {key: statistics.median(p[i][key] for p in raws) for key in raws[0][i]} for i in range(len(raws[0]))
    ]
    rows = ", ".join(
        f"{r['seqs']:.0f} seq{'s' if r['seqs'] > 1 else ''} {r['tok_s']:.0f} tok/s "
        f"({r['step_ms']:.1f} ms a step)"
        for r in raw
    )
    lines = [
        f"- ceiling, raw batched llama_decode with no server and no prompts to prefill "
        f"(raw_decode.py, median of {len(raws)}): {rows}; one 60-token prompt prefills in "
        f"{raw[-1]['prefill_ms']:.0f} ms"
    ]
    # Each reply also prefills its uncached prompt tokens, which cost nearly what decoded ones do
    # here (Q4_1 has no GEMM path on this CPU): at the raw rates, the most any server can deliver.
    last = raw[-1]
    reply_ms = max_tokens * last["step_ms"] / last["seqs"] + NEW_PROMPT_TOKENS * last["prefill_ms"] / 60
    with_prompts = max_tokens / reply_ms * 1000
    lines.append(
        f"- ceiling with the prompts (an estimate from the raw rates): {max_tokens} decoded "
        f"tokens at "
        f"{last['step_ms'] / last['seqs']:.1f} ms plus {NEW_PROMPT_TOKENS} prompt tokens at "
        f"{last['prefill_ms'] / 60:.1f} ms per reply: {with_prompts:.0f} tok/s"
    )
    ls = find(rows_, "llama-server", users)
    if ls and ls.aggregate:
        lines.append(
            f"- 1.25x llama-server would be {1.25 * ls.aggregate:.0f} tok/s: "
            f"{1.25 * ls.aggregate / last['tok_s']:.0%} of the decode-only ceiling, "
            f"{1.25 * ls.aggregate / with_prompts:.0%} of the ceiling with the prompts"
        )
    return lines


def verdicts(rows: list[Summary], users: int) -> list[str]:
    """The issue's targets, judged on the medians that exist (the script reports, never fails)."""
    lines: list[str] = []
    il, ls = find(rows, "interlock", users), find(rows, "llama-server", users)
    il1, direct = find(rows, "interlock", 1), find(rows, "direct Llama", 1)
    ratio_ls = il.aggregate / ls.aggregate if il and ls and ls.aggregate else None
    ratio_direct = il1.per_user / direct.per_user if il1 and direct and direct.per_user else None
    if ratio_ls is not None:
        lines.append(f"- Interlock / llama-server aggregate ({users} users): **{ratio_ls:.2f}x**")
    if ratio_direct is not None:
        lines.append(f"- Interlock 1-user / direct Llama tok/s: **{ratio_direct:.2f}**")
    if il:
        p50 = il.ttft_p50

        def mark(ok: bool) -> str:
            return "met" if ok else "MISSED"

        lines.append(
            f"- target: {users} users aggregate >= 180 tok/s: {il.aggregate:.1f} "
            f"({mark(il.aggregate >= 180)})"
        )
        if ratio_ls is not None:
            lines.append(f"- target: >= 1.25x llama-server: {ratio_ls:.2f}x ({mark(ratio_ls >= 1.25)})")
        lines.append(f"- target: TTFT p50 < 150 ms: {ms(p50)} ms ({mark(p50 is not None and p50 < 0.150)})")
        lines.append(f"- target: zero dropped streams: {il.dropped} ({mark(il.dropped == 0)})")
        if ratio_direct is not None:
            lines.append(
                f"- target: 1 user within 10% of direct Llama: {ratio_direct:.2f} "
                f"({mark(ratio_direct >= 0.9)})"
            )
    return lines


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def report(
    runs: list[Run],
    raws: list[list[dict[str, float]]],
    args: argparse.Namespace,
    argv: list[str],
    *,
    n_ctx: int,
    parallel: int,
) -> str:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = [
        "# llama.cpp batching benchmark",
        "",
        f"- date: {now}",
        f"- machine: nproc {os.cpu_count()}, {cpu_name()}",
        f"- command: `{shlex.join(argv)}`",
        f"- git commit: {git_commit(short=True)}",
        f"- workload: SmolLM2-135M-Instruct Q4_1, streamed chat, max_tokens {args.max_tokens}, "
        f"temperature 0{_extra_note(args.extra_body)}, {args.threads} threads per server, n_ctx {n_ctx}, "
        f"parallel {parallel} "
        "(Interlock, llama-server); llama_cpp.server runs with `--interrupt_requests False` "
        "(its default cuts a running stream short whenever another request waits)",
        "",
        "Tokens are content chunks received; aggregate = all tokens / wall time of the run; "
        "per-user = a user's tokens / time it spent in requests (median over users); "
        "TTFT = send to first non-empty content delta; after round 1 = of every user's requests "
        "but the first (all users send their first at once; each later one follows its reply); "
        "first byte = send to the first SSE "
        "`data:` line of any kind (direct Llama: its first chunk); dropped = error, 120 s timeout, or no "
        "finish_reason + `[DONE]`. Each server is warmed up with one short request first. "
        "other load = cores used on average by processes other than the benchmark and the "
        "server measured (the machine is shared; above ~0.1 a row is skewed, and such a run is "
        "measured again, up to --retries times, keeping the quietest).",
        "",
    ]
    rows = summarize(runs)
    return "\n".join(
        [
            *header,
            f"Medians over {args.passes} interleaved pass(es) (every server, then every server again, ...):",
            "",
            summary_table(rows),
            "",
            *verdicts(rows, args.users),
            *ceiling(raws, rows, args.users, args.max_tokens),
            "",
            "Every run:",
            "",
            table(runs),
            "",
        ]
    )
