"""Routing rules of a ``kind: vllm`` pool, compared on two vLLM servers behind the real gateway.

    PYTHONPATH=/tmp/site:. python3 benchmarks/vllm_pool/bench.py            # on the GPU machine
    .venv/bin/python benchmarks/vllm_pool/bench.py --quick --endpoints ...  # a smoke test

One gateway process per routing rule (``round_robin``, ``least_in_flight``, ``conversation_hash``,
``auto``), each a routing file with one ``kind: vllm`` backend over ``--endpoints``; all four run
for the whole benchmark and take turns, one run at a time.

Workload "prefix" (what affinity is for): ``--conversations`` conversations of ``--turns`` turns,
each opening with its own ~``--words``-word system prompt (random common words from a seeded
generator); each turn sends the whole history (system prompt, earlier user messages and the
replies actually received) plus a new user message, so every turn's prompt extends the previous
one. ``--users`` workers pull the next turn of any conversation that has one ready, so a
conversation's turns run in order and, with 48 users and 24 conversations, every conversation
always has its next turn in flight (``--branches 2`` gives each conversation two independent
threads sharing its system prompt and session, for 48 users busy at once). Every request sends
``x-interlock-session: <conversation>``.

Workload "hot-prefix" (``--workload hot-prefix``; what affinity must not cost later turns):
``--hot-conversations`` conversations of ``--hot-turns`` turns opening with one of
``--hot-prompts`` long system prompts (``--words`` words each) of Zipf popularity, the hottest
in ``--hot-share`` of the conversations (the rest spread 1/k over the others); no session
header, so the pool sees only the prompts. ``--users`` workers take any conversation's next turn.

Workload "unique" (what affinity must not cost): ``--unique-requests`` requests, each a prompt of
the same size that shares nothing with any other, from ``--users`` workers; ``auto`` against
``least_in_flight``, the load-only rule.

Every request: streamed chat, ``max_tokens`` 32, ``temperature`` 0, ``ignore_eos: true`` (an
extra field the gateway passes through; a dummy-weight model would otherwise stop at random) and
``include_usage``. TTFT is the time to the first SSE event carrying a choice (vLLM sends its role
chunk together with the first token); tok/s is the completion tokens (usage, else content
chunks) of a run over its wall time. Every run uses prompts no earlier run sent (a run tag opens
each prompt, so vLLM's prefix cache cannot carry one run's work into the next) with the same
lengths and words across rules. Runs interleave (round 1: every rule once, round 2: again, the
starting rule rotated) so slow drift of the servers spreads over all rules; the table reports
the median of the runs of each metric. Runs are ``--gap`` (3 s) apart, so that each gateway's
last /metrics scrape shows idle servers when a run starts. Also per run, from the servers and
the gateway: vLLM's prefix-cache hit rate (deltas of ``vllm:prefix_cache_hits_total /
queries_total``) and how the requests split across endpoints (``/admin/routes``).

A hard time limit (``--time-limit``, 480 s) covers everything: a run that would not fit is not
started and one that overruns is cut; what finished is reported. Results print as they come;
the markdown table (and the raw runs as JSON) is rewritten after every run under ``$OUT`` when it
is set, so a call killed at its limit still brings back what finished.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import poolkit

from benchmarks.common import SseStream, git_commit, percentile  # importable: poolkit adds the root

RULES = ("round_robin", "least_in_flight", "conversation_hash", "auto")
UNIQUE_RULES = ("least_in_flight", "auto")
#: --workload names -> the names results carry ("prefix" is the shared-prefix workload)
WORKLOADS = {"shared-prefix": "prefix", "prefix": "prefix", "unique": "unique", "hot-prefix": "hot-prefix"}
#: common English words: nearly one token each in SmolLM2's vocabulary, so words ~ tokens
WORDS = (
    "the of and to in is was for on that with as by at from his her they this which were are be "
    "had not but have one all when there can been has more who will their if out so up would into "
    "time only new some could these two may first then do any like my now over such our man me "
    "even most made after also did many before must through back years where much your way well "
    "down should because each just those people how too little state good very make world still "
    "own see men work long here get both between life being under never day same another know "
    "while last might us great old year off come since against go came right used take three "
    "house water river stone light bridge garden window market winter summer morning evening "
    "letter number paper table street city country family story music color animal mountain "
    "forest island ocean answer question reason power money school church office doctor teacher "
    "student village kingdom engine machine signal system method theory energy figure pattern "
    "simple careful quiet bright early heavy narrow ancient modern gentle sudden silver golden "
    "travel follow listen gather carry build break choose explain measure balance remember"
).split()


# --- the workloads ----------------------------------------------------------------------------


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


def system_prompt(seed: int, run: int, conversation: int, count: int, tag: str) -> str:
    """The same words for a (run, conversation) under every rule; the tag opens the prompt, so no
    two runs share even their first cache block. Tags are fixed-width: prompt lengths match too."""
    rng = random.Random(f"{seed}/system/{run}/{conversation}")
    return f"[{tag}] You are assistant {conversation:03d}. Keep these notes in mind: {words(rng, count)}"


def user_message(seed: int, run: int, conversation: int, branch: int, turn: int) -> str:
    rng = random.Random(f"{seed}/user/{run}/{conversation}/{branch}/{turn}")
    return f"Question {turn + 1}: {words(rng, rng.randint(18, 30))}?"


@dataclass
class Sample:
    """One request as the client saw it."""

    ttft_s: float | None = None
    #: the conversation turn it was (prefix workload; 0 = the opening, cold, turn)
    turn: int = 0
    tokens: int = 0
    text: str = ""
    error: str = ""


@dataclass
class RunResult:
    workload: str
    rule: str
    round: int
    requests: int
    errors: int
    wall_s: float
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    #: p99 over the turns after a conversation's first: where its prefix can be cached, so where
    #: routing shows (the first turns all prefill their cold system prompts at once)
    later_p99_ms: float | None
    tok_s: float
    prefix_hit: float | None
    split: list[int] = field(default_factory=list)
    aborted: bool = False
    first_error: str = ""


async def stream_chat(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str]
) -> Sample:
    sample = Sample()
    start = time.perf_counter()
    chunks = 0
    usage_tokens: int | None = None
    parts: list[str] = []
    stream = SseStream()
    try:
        async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as response:
            if response.status != 200:
                sample.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                return sample
            async for event in stream.events(response.content):
                if "error" in event:
                    sample.error = f"stream error: {json.dumps(event['error'])[:200]}"
                    return sample
                choices = event.get("choices") or []
                if choices and sample.ttft_s is None:
                    sample.ttft_s = time.perf_counter() - start
                for choice in choices:
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        chunks += 1
                        parts.append(content)
                usage = event.get("usage")
                if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                    usage_tokens = usage["completion_tokens"]
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
        sample.error = f"{type(exc).__name__}: {exc}"[:200]
        return sample
    if not stream.done:
        sample.error = "the stream ended without data: [DONE]"
    sample.tokens = usage_tokens if usage_tokens is not None else chunks
    sample.text = "".join(parts)
    return sample


def request_body(model: str, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }


async def prefix_workload(
    session: aiohttp.ClientSession,
    url: str,
    args: argparse.Namespace,
    round_: int,
    tag: str,
    samples: list[Sample],
) -> None:
    """Each conversation its own system prompt, and its session header."""
    systems = {c: system_prompt(args.seed, round_, c, args.words, tag) for c in range(args.conversations)}
    await conversations(session, url, args, round_, tag, samples, systems, args.turns, args.branches, True)


def hot_openings(args: argparse.Namespace) -> list[int]:
    """Which system prompt opens each conversation: the hottest in ``hot_share`` of them, the
    others by 1/k (Zipf) popularity; shuffled alike for every rule and run."""
    n, k = args.hot_conversations, args.hot_prompts
    hottest = min(n, round(args.hot_share * n))
    weights = [1 / (i + 1) for i in range(1, k)]
    rest = [round((n - hottest) * w / sum(weights)) for w in weights] if k > 1 else []
    while rest and sum(rest) + hottest > n:
        rest[rest.index(max(rest))] -= 1
    while sum(rest) + hottest < n:
        if rest:
            rest[0] += 1
        else:
            hottest += 1
    openings = [0] * hottest + [i + 1 for i, count in enumerate(rest) for _ in range(count)]
    random.Random(f"{args.seed}/hot").shuffle(openings)
    return openings


async def hot_prefix_workload(
    session: aiohttp.ClientSession,
    url: str,
    args: argparse.Namespace,
    round_: int,
    tag: str,
    samples: list[Sample],
) -> None:
    """A few long system prompts shared by many conversations (Zipf), no session header."""
    prompts = [system_prompt(args.seed, round_, 500 + p, args.words, tag) for p in range(args.hot_prompts)]
    systems = {c: prompts[p] for c, p in enumerate(hot_openings(args))}
    await conversations(session, url, args, round_, tag, samples, systems, args.hot_turns, 1, False)


async def conversations(
    session: aiohttp.ClientSession,
    url: str,
    args: argparse.Namespace,
    round_: int,
    tag: str,
    samples: list[Sample],
    systems: dict[int, str],
    turns: int,
    branches: int,
    with_session: bool,
) -> None:
    """Conversations whose turns run in order; any idle worker takes any conversation's next turn."""
    units = [(c, b) for c in systems for b in range(branches)]
    history: dict[tuple[int, int], list[dict[str, str]]] = {
        (c, b): [{"role": "system", "content": systems[c]}] for c, b in units
    }
    turn: dict[tuple[int, int], int] = dict.fromkeys(units, 0)
    ready: asyncio.Queue[tuple[int, int] | None] = asyncio.Queue()
    for unit in units:
        ready.put_nowait(unit)
    left = len(units)

    async def worker() -> None:
        nonlocal left
        while True:
            unit = await ready.get()
            if unit is None:
                return
            c, b = unit
            messages = history[unit]
            messages.append({"role": "user", "content": user_message(args.seed, round_, c, b, turn[unit])})
            sample = await stream_chat(
                session,
                url,
                request_body(args.model, messages, args.max_tokens),
                {"x-interlock-session": f"{tag}-c{c:03d}"} if with_session else {},
            )
            sample.turn = turn[unit]
            samples.append(sample)
            # a failed turn still moves the conversation on, so one error does not stall the run
            messages.append({"role": "assistant", "content": sample.text or "(no reply)"})
            turn[unit] += 1
            if turn[unit] < turns:
                ready.put_nowait(unit)
            else:
                left -= 1
                if left == 0:
                    for _ in range(args.users):
                        ready.put_nowait(None)

    await asyncio.gather(*(worker() for _ in range(args.users)))


async def unique_workload(
    session: aiohttp.ClientSession,
    url: str,
    args: argparse.Namespace,
    round_: int,
    tag: str,
    samples: list[Sample],
) -> None:
    """Requests sharing no prefix at all: only load can guide the choice."""
    pending: asyncio.Queue[int] = asyncio.Queue()
    for i in range(args.unique_requests):
        pending.put_nowait(i)

    async def worker() -> None:
        while not pending.empty():
            i = pending.get_nowait()
            system = system_prompt(args.seed, round_, 1000 + i, args.words, tag)
            messages = [
                {"role": "system", "content": system},
                {"role": "user", "content": user_message(args.seed, round_, 1000 + i, 0, 0)},
            ]
            body = request_body(args.model, messages, args.max_tokens)
            samples.append(await stream_chat(session, url, body, {}))

    await asyncio.gather(*(worker() for _ in range(args.users)))


async def warm_up(session: aiohttp.ClientSession, endpoints: list[str], args: argparse.Namespace) -> None:
    """A few long prompts straight to each server: first-use costs (kernels for new shapes,
    allocator growth) land here, not in the first measured run."""
    jobs = []
    for e, endpoint in enumerate(endpoints):
        for i in range(4):
            messages = [
                {
                    "role": "system",
                    "content": system_prompt(args.seed, -1, e * 10 + i, args.words, f"warm-{e}-{i}"),
                },
                {"role": "user", "content": "Hello?"},
            ]
            jobs.append(stream_chat(session, endpoint, request_body(args.model, messages, 8), {}))
    results = await asyncio.gather(*jobs)
    failed = [r.error for r in results if r.error]
    print(
        f"warm-up: {len(results) - len(failed)}/{len(results)} ok"
        + (f"; first error: {failed[0]}" if failed else ""),
        flush=True,
    )


# --- running and reporting ---------------------------------------------------------------------


Counters = list[tuple[float, float] | None]


def hit_rate(before: Counters, after: Counters) -> float | None:
    queries = hits = 0.0
    for b, a in zip(before, after, strict=True):
        if a is None or b is None:
            return None
        queries += a[0] - b[0]
        hits += a[1] - b[1]
    return hits / queries if queries > 0 else None


def served(gateway: poolkit.Gateway, endpoints: list[str]) -> list[int]:
    by_url = {e["url"].rstrip("/"): int(e.get("served") or 0) for e in gateway.pool_endpoints()}
    return [by_url.get(url, 0) for url in endpoints]


async def one_run(
    session: aiohttp.ClientSession,
    gateway: poolkit.Gateway,
    endpoints: list[str],
    args: argparse.Namespace,
    workload: str,
    rule: str,
    round_: int,
    budget_s: float,
) -> RunResult:
    # fixed width, so prompts are equally long whatever the rule's name
    tag = f"{args.nonce}-{workload[0]}-{RULES.index(rule)}-{round_:02d}"
    loop = asyncio.get_running_loop()
    before_hits = await asyncio.gather(
        *(loop.run_in_executor(None, poolkit.prefix_counters, e) for e in endpoints)
    )
    before_split = await loop.run_in_executor(None, served, gateway, endpoints)
    runner = {"prefix": prefix_workload, "hot-prefix": hot_prefix_workload, "unique": unique_workload}[
        workload
    ]
    samples: list[Sample] = []
    aborted = False
    start = time.perf_counter()
    try:
        # the workload appends as requests finish, so a cut run keeps what it completed
        await asyncio.wait_for(runner(session, gateway.url, args, round_, tag, samples), max(1.0, budget_s))
    except TimeoutError:
        aborted = True
    wall = time.perf_counter() - start
    after_hits = await asyncio.gather(
        *(loop.run_in_executor(None, poolkit.prefix_counters, e) for e in endpoints)
    )
    after_split = await loop.run_in_executor(None, served, gateway, endpoints)
    ok = [s for s in samples if not s.error]
    errors = [s for s in samples if s.error]
    ttfts = [s.ttft_s * 1000 for s in ok if s.ttft_s is not None]
    later = [s.ttft_s * 1000 for s in ok if s.ttft_s is not None and s.turn > 0]
    return RunResult(
        workload=workload,
        rule=rule,
        round=round_,
        requests=len(samples),
        errors=len(errors),
        wall_s=wall,
        ttft_p50_ms=percentile(ttfts, 0.5),
        ttft_p99_ms=percentile(ttfts, 0.99),
        later_p99_ms=percentile(later, 0.99) if workload != "unique" else None,
        tok_s=sum(s.tokens for s in ok) / wall if wall > 0 else 0.0,
        prefix_hit=hit_rate(before_hits, after_hits),
        split=[a - b for a, b in zip(after_split, before_split, strict=True)],
        aborted=aborted,
        first_error=errors[0].error if errors else "",
    )


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def fmt_pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def median_of(results: list[RunResult], key: str) -> float | None:
    values = [getattr(r, key) for r in results if getattr(r, key) is not None]
    return statistics.median(values) if values else None


def run_line(r: RunResult) -> str:
    return (
        f"{r.workload:<10} {r.rule:<17} round {r.round + 1}: {r.requests} req, {r.errors} err, "
        f"TTFT p50 {fmt_ms(r.ttft_p50_ms)} ms p99 {fmt_ms(r.ttft_p99_ms)} ms (after turn 1: "
        f"{fmt_ms(r.later_p99_ms)}), {r.tok_s:,.0f} tok/s, "
        f"hit {fmt_pct(r.prefix_hit)}, split {'/'.join(map(str, r.split))}, wall {r.wall_s:.1f}s"
        + (" ABORTED (time limit)" if r.aborted else "")
        + (f"; first error: {r.first_error}" if r.first_error else "")
    )


def verdicts(results: list[RunResult]) -> list[str]:
    """The targets, on the medians: each line says the numbers and PASS/FAIL (n/a if not measured)."""

    def med(workload: str, rule: str, key: str) -> float | None:
        runs = [r for r in results if r.workload == workload and r.rule == rule and not r.aborted]
        return median_of(runs, key)

    lines = []
    auto_p99 = med("prefix", "auto", "ttft_p99_ms")
    hash_p99 = med("prefix", "conversation_hash", "ttft_p99_ms")
    if auto_p99 is not None and hash_p99:
        lower = 1 - auto_p99 / hash_p99
        lines.append(
            f"- prefix: auto TTFT p99 {auto_p99:,.0f} ms vs conversation_hash {hash_p99:,.0f} ms: "
            f"{100 * lower:+.1f}% lower (target >= 15%): {'PASS' if lower >= 0.15 else 'FAIL'}"
        )
    else:
        lines.append("- prefix: auto vs conversation_hash TTFT p99: n/a")
    auto_later, hash_later = (
        med("prefix", "auto", "later_p99_ms"),
        med("prefix", "conversation_hash", "later_p99_ms"),
    )
    if auto_later is not None and hash_later:
        lines.append(
            f"- prefix, turns after the first (no target; where routing shows): auto TTFT p99 "
            f"{auto_later:,.0f} ms vs conversation_hash {hash_later:,.0f} ms: "
            f"{100 * (1 - auto_later / hash_later):+.1f}% lower"
        )
    auto_t, hash_t = med("prefix", "auto", "tok_s"), med("prefix", "conversation_hash", "tok_s")
    if auto_t is not None and hash_t:
        lines.append(
            f"- prefix: auto {auto_t:,.0f} tok/s vs conversation_hash {hash_t:,.0f} tok/s: "
            f"ratio {auto_t / hash_t:.3f} (target >= 1): {'PASS' if auto_t >= hash_t else 'FAIL'}"
        )
    else:
        lines.append("- prefix: auto vs conversation_hash tok/s: n/a")
    auto_u, lif_u = med("unique", "auto", "tok_s"), med("unique", "least_in_flight", "tok_s")
    if auto_u is not None and lif_u:
        ratio = auto_u / lif_u
        p50a, p50l = med("unique", "auto", "ttft_p50_ms"), med("unique", "least_in_flight", "ttft_p50_ms")
        p99a, p99l = med("unique", "auto", "ttft_p99_ms"), med("unique", "least_in_flight", "ttft_p99_ms")
        ttft = (
            f"; TTFT p50 ratio {p50a / p50l:.3f}, p99 ratio {p99a / p99l:.3f}"
            if p50a is not None and p50l and p99a is not None and p99l
            else ""
        )
        lines.append(
            f"- unique: auto {auto_u:,.0f} tok/s vs least_in_flight {lif_u:,.0f} tok/s: "
            f"ratio {ratio:.3f} (target: within 5%, >= 0.95): "
            f"{'PASS' if ratio >= 0.95 else 'FAIL'}{ttft}"
        )
    else:
        lines.append("- unique: auto vs least_in_flight: n/a")
    return lines


def auto_targets(results: list[RunResult], workload: str) -> list[str]:
    """Issue 18's targets for ``auto`` against the best fixed rule on one workload, on the medians:
    later-turn TTFT p99 <= best + 5%, overall p99 <= best, tok/s >= best - 2%, prefix-cache hit
    rate >= conversation_hash's."""

    def med(rule: str, key: str) -> float | None:
        runs = [r for r in results if r.workload == workload and r.rule == rule and not r.aborted]
        return median_of(runs, key)

    fixed = [r for r in RULES if r != "auto"]
    lines = []
    checks = (
        ("later-turn TTFT p99", "later_p99_ms", min, 1.05, "<="),
        ("TTFT p99", "ttft_p99_ms", min, 1.0, "<="),
        ("tok/s", "tok_s", max, 0.98, ">="),
    )
    for label, key, best_of, factor, sense in checks:
        auto = med("auto", key)
        others = {r: v for r in fixed if (v := med(r, key)) is not None}
        if auto is None or not others:
            lines.append(f"- {workload}: auto {label} vs the best fixed rule: n/a")
            continue
        best_rule = best_of(others, key=lambda r: others[r])
        bound = others[best_rule] * factor
        ok = auto <= bound if sense == "<=" else auto >= bound
        lines.append(
            f"- {workload}: auto {label} {auto:,.1f} vs best fixed ({best_rule}) {others[best_rule]:,.1f}: "
            f"target {sense} {bound:,.1f}: {'PASS' if ok else 'FAIL'}"
        )
    auto_hit, hash_hit = med("auto", "prefix_hit"), med("conversation_hash", "prefix_hit")
    if auto_hit is not None and hash_hit is not None:
        lines.append(
            f"- {workload}: auto prefix hit {fmt_pct(auto_hit)} vs conversation_hash {fmt_pct(hash_hit)} "
            f"(target >=): {'PASS' if auto_hit >= hash_hit else 'FAIL'}"
        )
    else:
        lines.append(f"- {workload}: auto vs conversation_hash prefix hit: n/a")
    return lines


def report(results: list[RunResult], args: argparse.Namespace, endpoints: list[str], note: str) -> str:
    now = f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC"
    lines = [
        f"# vLLM pool routing ({now}, commit {git_commit(short=True)})",
        "",
        f"Endpoints {', '.join(endpoints)}, model `{args.model}`; streamed chat, "
        f"max_tokens {args.max_tokens}, temperature 0, ignore_eos. Command: `{' '.join(sys.argv)}`.",
        f"prefix: {args.conversations} conversations x {args.turns} turns"
        + (f" x {args.branches} branches" if args.branches > 1 else "")
        + f", ~{args.words}-word system prompts, {args.users} users, x-interlock-session per conversation. "
        f"unique: {args.unique_requests} requests of the same size sharing nothing, {args.users} users. "
        f"hot-prefix: {args.hot_conversations} conversations x {args.hot_turns} turns opening with one of "
        f"{args.hot_prompts} ~{args.words}-word system prompts (Zipf, the hottest in "
        f"{100 * args.hot_share:.0f}%), no session header, {args.users} users. "
        f"Workloads run: {', '.join(args.workloads)}.",
        f"Medians over the runs (runs interleaved across rules). {note}".rstrip(),
        "",
        "| workload | rule | TTFT p50 ms | TTFT p99 ms | p99 after turn 1 | tok/s | vLLM prefix hit | split "
        "| errors | runs |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for workload in args.workloads:
        rules = args.unique_rules if workload == "unique" else args.rules
        for rule in rules:
            runs = [r for r in results if r.workload == workload and r.rule == rule and not r.aborted]
            if not runs:
                continue
            per_endpoint = zip(*(r.split for r in runs), strict=True)
            split = "/".join(str(round(statistics.median(s))) for s in per_endpoint)
            lines.append(
                f"| {workload} | {rule} | {fmt_ms(median_of(runs, 'ttft_p50_ms'))} | "
                f"{fmt_ms(median_of(runs, 'ttft_p99_ms'))} | "
                f"{fmt_ms(median_of(runs, 'later_p99_ms'))} | "
                f"{median_of(runs, 'tok_s') or 0:,.0f} | "
                f"{fmt_pct(median_of(runs, 'prefix_hit'))} | {split} | "
                f"{sum(r.errors for r in runs)} | {len(runs)} |"
            )
    lines += [
        "",
        "Targets (on the medians):",
        *verdicts(results),
        *[line for w in args.workloads if w != "unique" for line in auto_targets(results, w)],
        "",
        "Every run:",
        "",
        "| workload | rule | round | TTFT p50 ms | TTFT p99 ms | p99 after turn 1 | tok/s | hit "
        "| split | wall s | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.workload} | {r.rule} | {r.round + 1}{' (cut)' if r.aborted else ''} | "
            f"{fmt_ms(r.ttft_p50_ms)} | {fmt_ms(r.ttft_p99_ms)} | {fmt_ms(r.later_p99_ms)} | "
            f"{r.tok_s:,.0f} | "
            f"{fmt_pct(r.prefix_hit)} | "
            f"{'/'.join(map(str, r.split))} | {r.wall_s:.1f} | {r.errors} |"
        )
    return "\n".join(lines) + "\n"


def save(results: list[RunResult], args: argparse.Namespace, endpoints: list[str], note: str) -> str:
    text = report(results, args, endpoints, note)
    out = poolkit.out_dir()
    if out is not None:
        (out / f"{args.name}.md").write_text(text, encoding="utf-8")
        raw = {"args": vars(args), "runs": [asdict(r) for r in results]}
        (out / f"{args.name}.json").write_text(json.dumps(raw, indent=1), encoding="utf-8")
    return text


async def bench(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    deadline = t0 + args.time_limit
    endpoints = poolkit.endpoint_list(args.endpoints)
    rules = list(dict.fromkeys([*args.rules, *(args.unique_rules if "unique" in args.workloads else ())]))
    out = poolkit.out_dir()
    configs = {rule: poolkit.pool_config(endpoints, args.model, rule) for rule in rules}
    results: list[RunResult] = []
    note = ""

    def elapsed() -> str:
        return f"[{time.monotonic() - t0:6.1f}s]"

    loop = asyncio.get_running_loop()
    with poolkit.gateways(configs, out) as running:
        urls = ", ".join(f"{r} {g.url}" for r, g in running.items())
        print(f"{elapsed()} gateways ready: {urls}", flush=True)
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        timeout = aiohttp.ClientTimeout(total=args.request_timeout, sock_connect=10)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await warm_up(session, endpoints, args)
            longest: dict[str, float] = {}
            stop = False
            for round_ in range(args.runs):
                plan = []
                for workload in args.workloads:
                    rules_here = args.unique_rules if workload == "unique" else args.rules
                    plan += [(workload, r) for r in _rotated(rules_here, round_)]
                for workload, rule in plan:
                    if results:
                        # Let every gateway scrape idle servers before the next run: auto counts
                        # load its last scrape saw beyond its own as other clients' (for up to three
                        # scrape intervals), and the previous run's tail would otherwise look like that.
                        await asyncio.sleep(args.gap)
                    left = deadline - time.monotonic()
                    # a run that would not fit is not started: a cut run's figures mean little
                    if left < 1.3 * longest.get(workload, 0.0) or left < 2:
                        note = (
                            f"Time limit ({args.time_limit:.0f}s) reached before {workload}/{rule} "
                            f"round {round_ + 1}: later runs were not started."
                        )
                        print(f"{elapsed()} {note}", flush=True)
                        stop = True
                        break
                    result = await one_run(
                        session, running[rule], endpoints, args, workload, rule, round_, left - 1
                    )
                    longest[workload] = max(longest.get(workload, 0.0), result.wall_s)
                    results.append(result)
                    print(f"{elapsed()} {run_line(result)}", flush=True)
                    await loop.run_in_executor(None, save, results, args, endpoints, note)
                    if result.aborted:
                        note = (
                            f"Time limit ({args.time_limit:.0f}s) cut {workload}/{rule} round {round_ + 1}."
                        )
                        stop = True
                        break
                if stop:
                    break
    text = save(results, args, endpoints, note)
    print("\n" + text, flush=True)
    failed = sum(r.errors for r in results)
    return 1 if not results or failed else 0


def _rotated(rules: Sequence[str], round_: int) -> list[str]:
    k = round_ % len(rules) if rules else 0
    return [*rules[k:], *rules[:k]]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--endpoints", default=poolkit.DEFAULT_ENDPOINTS, help="comma-separated vLLM base URLs")
    p.add_argument("--model", default="llama8b", help="the served model name")
    p.add_argument("--rules", default=",".join(RULES), help="routing rules for the prefix workload")
    p.add_argument(
        "--unique-rules",
        default=",".join(UNIQUE_RULES),
        help="routing rules for the no-shared-prefix workload ('' to skip it)",
    )
    p.add_argument("--runs", type=int, help="runs per rule and workload (default 3; --quick 1)")
    p.add_argument("--users", type=int, help="concurrent workers (default 48; --quick 8)")
    p.add_argument("--conversations", type=int, help="conversations (default 24; --quick 4)")
    p.add_argument("--turns", type=int, help="turns per conversation (default 6; --quick 3)")
    p.add_argument(
        "--branches",
        type=int,
        default=1,
        help="independent threads per conversation, sharing its system prompt and session",
    )
    p.add_argument("--words", type=int, help="words per system prompt (default 1500; --quick 300)")
    p.add_argument(
        "--unique-requests", type=int, help="requests of the unique workload (default 144; --quick 12)"
    )
    p.add_argument(
        "--workload",
        default="shared-prefix,unique",
        help="comma-separated: shared-prefix, unique, hot-prefix (default: shared-prefix,unique)",
    )
    p.add_argument("--hot-conversations", type=int, help="hot-prefix conversations (default 96; --quick 12)")
    p.add_argument("--hot-turns", type=int, help="hot-prefix turns per conversation (default 3)")
    p.add_argument("--hot-prompts", type=int, default=6, help="hot-prefix system prompts")
    p.add_argument(
        "--hot-share",
        type=float,
        default=0.6,
        help="share of hot-prefix conversations opening with the hottest",
    )
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--time-limit", type=float, default=480.0, help="seconds for everything, gateways included"
    )
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument(
        "--gap",
        type=float,
        default=3.0,
        help="idle seconds between runs (more than the pool's 2 s scrape interval)",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    p.add_argument("--name", default="vllm_pool", help="stem of the files written under $OUT")
    args = p.parse_args(argv)
    sizes = {
        "runs": (3, 1),
        "users": (48, 8),
        "conversations": (24, 4),
        "turns": (6, 3),
        "words": (1500, 300),
        "unique_requests": (144, 12),
        "hot_conversations": (96, 12),
        "hot_turns": (3, 3),
    }
    for name, (full, quick) in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    # opens every prompt's tag: a second invocation on the same servers finds none of its prompts
    # in their prefix caches (the words themselves stay fixed by --seed)
    args.nonce = os.urandom(3).hex()
    args.rules = [r for r in args.rules.split(",") if r]
    args.unique_rules = [r for r in args.unique_rules.split(",") if r]
    names = [w.strip() for w in args.workload.split(",") if w.strip()]
    bad = [w for w in names if w not in WORKLOADS]
    if bad or not names:
        p.error(
            f"unknown workload(s): {', '.join(bad) or '(none)'} (known: shared-prefix, unique, hot-prefix)"
        )
    args.workloads = list(dict.fromkeys(WORKLOADS[w] for w in names))
    if not 0 < args.hot_share <= 1 or args.hot_prompts < 1:
        p.error("--hot-share must be in (0, 1] and --hot-prompts at least 1")
    unknown = [r for r in (*args.rules, *args.unique_rules) if r not in RULES]
    if unknown:
        p.error(f"unknown routing rule(s): {', '.join(unknown)} (known: {', '.join(RULES)})")
    return args


def main() -> None:
    args = parse_args()
    try:
        sys.exit(asyncio.run(bench(args)))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
