"""The flags of ``interlock bench`` and ``interlock mock-upstream``."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import urllib.parse
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from gateway import __version__


def add_parsers(sub: Any) -> None:
    b = sub.add_parser(
        "bench",
        help="load an OpenAI-compatible endpoint (the gateway or a backend); figures, JSON, a plot",
        description="Closed loop (--concurrency) or open loop (--rate); one point per value of a list.",
    )
    b.add_argument(
        "--url",
        default=os.environ.get("INTERLOCK_URL", "http://127.0.0.1:8080/v1"),
        help="the OpenAI base URL (env INTERLOCK_URL; /v1 is added to a bare host)",
    )
    b.add_argument("--key", help="a client key (env INTERLOCK_API_KEY)")
    b.add_argument("--model", required=True)
    b.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    b.add_argument("--concurrency", help="closed loop: users at once, or a list to sweep: 1,2,4,8")
    b.add_argument("--rate", help="open loop: sessions a second, or a list to sweep: 1,2,4")
    b.add_argument(
        "--arrivals",
        choices=["poisson", "constant", "trace"],
        default="poisson",
        help="open loop arrivals (trace: the trace's timestamps)",
    )
    b.add_argument("--cap", type=int, default=256, help="open loop: most requests in flight (default 256)")
    b.add_argument("--duration", type=float, help="seconds per point")
    b.add_argument("--requests", type=int, help="requests per point")
    b.add_argument("--prompt-tokens", default="128", help="128, 64-256 (uniform) or normal:128,32")
    b.add_argument("--max-tokens", default="64", help="reply length: 128, 64-256 or normal:128,32")
    b.add_argument("--shared-prefix", type=float, default=0.0, help="share of each prompt common to all")
    b.add_argument("--rounds", type=int, default=1, help="multi-turn: rounds per session (growing history)")
    b.add_argument("--repeat", type=float, default=0.0, help="share of sessions that repeat an earlier one")
    b.add_argument("--trace", type=Path, help="JSONL trace to replay (messages|prompt, max_tokens, ...)")
    b.add_argument("--no-stream", action="store_true", help="ask for whole replies, not SSE")
    b.add_argument("--temperature", type=float, default=0.0)
    b.add_argument("--ignore-eos", action="store_true", help="send vLLM's ignore_eos: replies of max_tokens")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--slo", help="goodput bound(s): ttft_ms=500,tpot_ms=50,e2el_ms=10000")
    b.add_argument("--direct", help="a backend's base URL: the same workload against it, side by side")
    b.add_argument("--direct-model", help="the model name the backend knows (default --model)")
    b.add_argument("--direct-key", help="the backend's key (env INTERLOCK_DIRECT_KEY)")
    b.add_argument(
        "--timeout", type=float, default=60.0, help="seconds without a byte before a request fails"
    )
    b.add_argument("--workers", type=int, default=1, help="processes to spread the load over")
    b.add_argument("--json", type=Path, help="write the figures here (schema: docs/bench.schema.json)")
    b.add_argument("--per-request", type=Path, help="write one JSON line per request here")
    b.add_argument("--plot", type=Path, help="write a PNG of tokens/s and TTFT against the sweep")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=cmd_bench)

    m = sub.add_parser("mock-upstream", help="an OpenAI-compatible server with a set pace and faults")
    m.add_argument("--host", default="127.0.0.1")
    m.add_argument("--port", "-p", type=int, default=8000)
    m.add_argument("--model", default="mock")
    m.add_argument("--ttft-ms", type=float, default=200.0)
    m.add_argument("--tokens-per-s", type=float, default=50.0, help="per stream; 0: as fast as possible")
    m.add_argument("--chunk-tokens", type=int, default=1, help="tokens per SSE event")
    m.add_argument("--usage", choices=["requested", "always", "never"], default="requested")
    m.add_argument("--default-tokens", type=int, default=16, help="reply length without max_tokens")
    m.add_argument(
        "--natural-tokens",
        type=int,
        default=0,
        help="replies end by themselves (finish_reason stop) after this many tokens",
    )
    m.add_argument("--max-running", type=int, default=0, help="requests generating at once; more queue")
    m.add_argument("--total-tokens-per-s", type=float, default=0.0, help="a pace the streams share")
    m.add_argument("--faults", help="probabilities per request: 5xx=0.05,429=0.05,cut=0.02,stall=0.01")
    m.add_argument("--retry-after", type=int, default=1, help="the 429's Retry-After (seconds)")
    m.add_argument("--stall-s", type=float, default=30.0, help="how long a stall lasts")
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=cmd_mock)


def cmd_mock(args: argparse.Namespace) -> int:
    from gateway.loadgen.mock import MockSettings, parse_faults, serve

    try:
        settings = MockSettings(
            model=args.model,
            ttft_ms=args.ttft_ms,
            tokens_per_s=args.tokens_per_s,
            chunk_tokens=args.chunk_tokens,
            usage=args.usage,
            default_tokens=args.default_tokens,
            natural_tokens=args.natural_tokens,
            max_running=args.max_running,
            total_tokens_per_s=args.total_tokens_per_s,
            faults=parse_faults(args.faults),
            retry_after_s=args.retry_after,
            stall_s=args.stall_s,
            seed=args.seed,
        )
    except ValueError as exc:
        print(f"interlock mock-upstream: {exc}", file=sys.stderr)
        return 2
    try:
        serve(settings, args.host, args.port)
    except OSError as exc:
        print(f"interlock mock-upstream: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    return 0


def _base_url(url: str, flag: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{flag} must be an http:// or https:// URL, not {url!r}")
    return url.rstrip("/") if parts.path.strip("/") else url.rstrip("/") + "/v1"


def _sweep(text: str, flag: str, kind: type) -> list[Any]:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag}: a number or a comma list of numbers, not {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"{flag}: values must be above 0")
    return values


def cmd_bench(args: argparse.Namespace) -> int:
    from gateway.loadgen import report, runner
    from gateway.loadgen.workload import Length, Workload

    try:
        url = _base_url(args.url, "--url")
        direct = _base_url(args.direct, "--direct") if args.direct else None
        slo = report.parse_slo(args.slo)
        workload = Workload(
            model=args.model,
            endpoint=args.endpoint,
            prompt_len=Length.parse(args.prompt_tokens),
            reply_len=Length.parse(args.max_tokens),
            shared_prefix=args.shared_prefix,
            rounds=args.rounds,
            repeat=args.repeat,
            stream=not args.no_stream,
            temperature=args.temperature,
            ignore_eos=args.ignore_eos,
            trace=args.trace,
            seed=args.seed,
        )
        if args.trace is not None:
            if not args.trace.is_file():
                raise ValueError(f"--trace: no file {args.trace}")
            next(workload.sessions())  # a bad line is named now, not from inside the run
        if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
            raise ValueError("--plot needs matplotlib: pip install 'interlock[bench]'")
        if args.workers < 1:
            raise ValueError("--workers must be at least 1")
        if args.concurrency and args.rate:
            raise ValueError("give --concurrency (closed loop) or --rate (open loop), not both")
        if args.arrivals == "trace":
            if args.trace is None or args.concurrency or args.rate:
                raise ValueError(
                    "--arrivals trace replays --trace at its timestamps: no --concurrency or --rate"
                )
            points: list[dict[str, Any]] = [{}]
        elif args.rate:
            points = [{"rate": r} for r in _sweep(args.rate, "--rate", float)]
        else:
            points = [{"concurrency": c} for c in _sweep(args.concurrency or "1", "--concurrency", int)]
        key = args.key or os.environ.get("INTERLOCK_API_KEY")
        direct_key = args.direct_key or os.environ.get("INTERLOCK_DIRECT_KEY")
        common = {
            "arrivals": args.arrivals,
            "cap": args.cap,
            "duration_s": args.duration,
            "requests": args.requests,
            "read_timeout_s": args.timeout,
            "workers": args.workers,
        }
        plans = [runner.Plan(url, workload, api_key=key, **common, **p) for p in points]
        direct_plans = []
        if direct:
            direct_workload = Workload(**{**_fields(workload), "model": args.direct_model or args.model})
            direct_plans = [
                runner.Plan(direct, direct_workload, api_key=direct_key, **common, **p) for p in points
            ]
    except ValueError as exc:
        print(f"interlock bench: {exc}", file=sys.stderr)
        return 2

    config = {
        "version": __version__,
        "url": url,
        "direct_url": direct,
        "model": args.model,
        "endpoint": args.endpoint,
        "stream": workload.stream,
        "mode": "open" if args.rate or args.arrivals == "trace" else "closed",
        "arrivals": args.arrivals,
        "duration_s": args.duration,
        "requests": args.requests,
        "workers": args.workers,
        "workload": {
            "prompt_tokens": args.prompt_tokens,
            "max_tokens": args.max_tokens,
            "shared_prefix": args.shared_prefix,
            "rounds": args.rounds,
            "repeat": args.repeat,
            "trace": str(args.trace) if args.trace else None,
        },
        "slo": slo or None,
    }
    console = _console()
    with ExitStack() as stack:
        jsonl = stack.enter_context(args.per_request.open("wb")) if args.per_request else None
        results: list[dict[str, Any]] = []
        direct_results: list[dict[str, Any]] = []
        # point by point, the gateway then the backend: the pair runs close together in time
        for i, plan in enumerate(plans):
            pair = [("gateway" if direct else "target", plan, results)]
            if direct_plans:
                pair.append(("direct", direct_plans[i], direct_results))
            for label, one, out in pair:
                result = _run_with_progress(one, label, console, args.no_progress)
                out.append(report.point_figures(result, slo))
                if jsonl:
                    report.write_requests(jsonl, result, label)
    doc = report.document(config, results, direct_results or None)
    if args.json:
        report.write_json(args.json, doc)
    if console is not None:
        _console(stdout=True).print(report.render(doc))
    else:
        for p in [*doc["points"], *(doc["direct_points"] or [])]:
            print(
                {
                    k: p[k]
                    for k in (
                        "max_concurrency",
                        "request_rate",
                        "completed",
                        "failed",
                        "request_throughput",
                        "median_ttft_ms",
                        "median_tpot_ms",
                        "errors",
                    )
                }
            )
    for line in report.warnings(doc):
        print(f"interlock bench: {line}", file=sys.stderr)
    if args.plot:
        from gateway.loadgen.plot import PlotUnavailable, plot

        try:
            plot(doc, args.plot)
        except PlotUnavailable as exc:
            print(f"interlock bench: {exc}", file=sys.stderr)
            return 2
    return 0


def _console(stdout: bool = False) -> Any:
    """A rich console (stderr for the progress, stdout for the table), or None without the extra."""
    try:
        from rich.console import Console
    except ImportError:
        return None
    stream = sys.stdout if stdout else sys.stderr
    return Console(stderr=not stdout, width=None if stream.isatty() else 180)


def _fields(workload: Any) -> dict[str, Any]:
    return {name: getattr(workload, name) for name in workload.__dataclass_fields__}


def _run_with_progress(plan: Any, label: str, console: Any, quiet: bool) -> Any:
    from gateway.loadgen import runner

    what = f"{label} " + (f"rate {plan.rate:g}/s" if plan.rate else f"{plan.concurrency or 'trace'} users")
    if console is None or quiet or not console.is_terminal:
        return runner.run(plan)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task(what, total=plan.requests)
        return runner.run(plan, tick=lambda: progress.advance(task))
