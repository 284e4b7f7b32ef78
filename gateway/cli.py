"""``interlock serve | check | routes | hash-key | bench | mock-upstream``."""

from __future__ import annotations

import argparse
import getpass
import hashlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from gateway import __version__
from gateway.config import ConfigError, LoadedConfig, default_config, load_config
from gateway.settings import Settings


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        k: v
        for k, v in {
            "config": args.config,
            "host": args.host,
            "port": args.port,
            "workers": args.workers,
            "log_level": args.log_level,
            "allow_unauthenticated": args.allow_unauthenticated or None,
        }.items()
        if v is not None
    }
    return Settings(**overrides)


def _load(settings: Settings) -> LoadedConfig:
    return load_config(settings.config) if settings.config else default_config()


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        settings = _settings(args)
    except ValidationError as exc:
        print(f"interlock: bad setting: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = _load(settings)
    except ConfigError as exc:
        print(f"interlock: {exc}", file=sys.stderr)
        return 2
    if any(getattr(b, "kind", None) == "llamacpp" for b in config.backends.values()):
        # libllama must be loaded before aiohttp's native modules: on CUDA builds, the other order
        # segfaults inside llama_model_load_from_file (seen on an H100 with llama-cpp-python 0.3.36).
        import backends.llamacpp.engine  # noqa: F401

    from gateway.server import UnsafeBind, serve  # uvicorn and aiohttp load only to serve

    try:
        return serve(config, settings)
    except (UnsafeBind, ConfigError) as exc:
        print(f"interlock: {exc}", file=sys.stderr)
        return 2


def cmd_check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.path)
    except ConfigError as exc:
        for path, message in exc.problems:
            print(f"{path}: {message}" if path else message, file=sys.stderr)
        print(f"{exc.source}: {len(exc.problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"{config.source}: ok ({len(config.backends)} backend(s), models: {', '.join(config.models)})")
    return 0


def cmd_hash_key(args: argparse.Namespace) -> int:
    key = args.key
    if key is None:
        key = getpass.getpass("key: ") if sys.stdin.isatty() else sys.stdin.readline().strip()
    if not key:
        print("interlock: empty key", file=sys.stderr)
        return 2
    print(hashlib.sha256(key.encode()).hexdigest())
    return 0


def cmd_routes(args: argparse.Namespace) -> int:
    """Print a running gateway's live ranking per route (GET /admin/routes) as a table."""
    import json
    import urllib.error
    import urllib.parse
    import urllib.request

    from backends.errors import InvalidRequest
    from gateway.admin_query import admin_routes_query

    query = {"prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens}
    if args.ttft_ms is not None:
        query["ttft_ms"] = args.ttft_ms
    try:  # the gateway would refuse these too; saying so here names the flag
        admin_routes_query(query)
    except InvalidRequest as exc:
        print(f"interlock: --{(exc.param or '').replace('_', '-')}: {exc.message}", file=sys.stderr)
        return 2
    parts = urllib.parse.urlsplit(args.url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        print(f"interlock: --url must be an http:// or https:// URL, not {args.url!r}", file=sys.stderr)
        return 2
    url = args.url.rstrip("/") + "/admin/routes?" + urllib.parse.urlencode(query)
    request = urllib.request.Request(url)
    key = args.key or os.environ.get("INTERLOCK_ADMIN_KEY")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            report = json.load(response)
    except urllib.error.HTTPError as exc:
        print(
            f"interlock: {url}: HTTP {exc.code}: {exc.read().decode(errors='replace')[:300]}", file=sys.stderr
        )
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"interlock: cannot reach {args.url}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return 1
    except ValueError:
        print(f"interlock: {url}: the answer is not JSON; is this an Interlock gateway?", file=sys.stderr)
        return 1
    try:
        table = render_routes(report)
    except (KeyError, TypeError, AttributeError):
        print(
            f"interlock: {url}: an answer of an unexpected shape; is this an Interlock gateway "
            "of the same version?",
            file=sys.stderr,
        )
        return 1
    print(table)
    return 0


def render_routes(report: dict[str, Any]) -> str:
    facts = report["request"]
    lines = [
        f"ranking for a request of {facts['prompt_tokens']} prompt tokens, "
        f"max_tokens {facts['max_tokens']}"
        + (f", ttft budget {facts['ttft_budget_ms']:g} ms" if facts.get("ttft_budget_ms") else "")
    ]
    header = (
        "#",
        "backend",
        "circuit",
        "healthy",
        "in flight",
        "samples",
        "err %",
        "ttft p50",
        "ttft p95",
        "tpot",
        "reason",
    )
    for name, route in report["routes"].items():
        lines.append("")
        lines.append(
            f"{name}  (policy {route['policy']}, attempts {route['attempts']}"
            + (", hedged" if route["hedge"] else "")
            + ")"
        )
        rows = [header]
        for i, entry in enumerate(route["order"], start=1):
            stats, breaker = entry["stats"], entry["breaker"]
            rows.append(
                (
                    str(i),
                    entry["backend"],
                    str(breaker.get("state", "?")),
                    {True: "yes", False: "NO", None: "-"}[entry["healthy"]],
                    str(entry["load"]["in_flight"]),
                    str(stats["samples"]),
                    f"{100 * stats['error_rate']:.0f}",
                    _ms(stats["ttft_p50_ms"]),
                    _ms(stats["ttft_p95_ms"]),
                    _ms(stats["tpot_ms"]),
                    entry["reason"],
                )
            )
        widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
        lines += [
            "  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows
        ]
        for entry in route["order"]:
            for ep in entry.get("endpoints", ()):  # a pool's endpoints (kind: vllm)
                kv = ep.get("kv_cache_usage")
                hit = ep.get("prefix_hit_rate")
                lines.append(
                    f"     {entry['backend']} > {ep['url']}: {'up' if ep['healthy'] else 'DOWN'}, "
                    f"{ep['in_flight']} in flight, {ep['outstanding_tokens']} tokens queued, "
                    f"running {ep.get('running')}, waiting {ep.get('waiting')}, "
                    f"kv {'-' if kv is None else f'{100 * kv:.0f}%'}, "
                    f"prefix hits {'-' if hit is None else f'{100 * hit:.0f}%'}"
                )
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}ms"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="interlock", description="An OpenAI-compatible LLM gateway.")
    p.add_argument("--version", action="version", version=f"interlock {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the gateway (no config: the embedded SmolLM2 model)")
    s.add_argument("--config", "-c", help="routing YAML (env INTERLOCK_CONFIG)")
    s.add_argument("--host", help="bind address (env INTERLOCK_HOST, default 127.0.0.1)")
    s.add_argument("--port", "-p", type=int, help="port (env INTERLOCK_PORT, default 8080)")
    s.add_argument(
        "--workers",
        "-w",
        type=int,
        help="gateway processes on the one port (env INTERLOCK_WORKERS, default 1); "
        "not with an in-process model (kind: llamacpp)",
    )
    s.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    s.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="serve beyond loopback with no client keys configured",
    )
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("check", help="validate a routing YAML; prints each problem with its path")
    c.add_argument("path")
    c.set_defaults(func=cmd_check)

    r = sub.add_parser("routes", help="show a running gateway's live ranking per route")
    r.add_argument(
        "--url",
        default=os.environ.get("INTERLOCK_URL", "http://127.0.0.1:8080"),
        help="the gateway (env INTERLOCK_URL)",
    )
    r.add_argument("--key", help="an admin client key (env INTERLOCK_ADMIN_KEY)")
    r.add_argument("--prompt-tokens", type=int, default=500)
    r.add_argument("--max-tokens", type=int, default=256)
    r.add_argument("--ttft-ms", type=float)
    r.set_defaults(func=cmd_routes)

    h = sub.add_parser("hash-key", help="print the sha256 of a client key for auth.keys[].sha256")
    h.add_argument("key", nargs="?", help="the key (read from stdin if omitted)")
    h.set_defaults(func=cmd_hash_key)

    from gateway.loadgen.cli import add_parsers  # flags only: the tool loads when its command runs

    add_parsers(sub)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    os.environ.setdefault("PYTHONFAULTHANDLER", "1")
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
