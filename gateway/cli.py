"""``interlock serve | check | hash-key``."""

from __future__ import annotations

import argparse
import getpass
import hashlib
import logging
import os
import sys
from collections.abc import Sequence

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
            "log_level": args.log_level,
            "allow_unauthenticated": args.allow_unauthenticated or None,
        }.items()
        if v is not None
    }
    return Settings(**overrides)


def _load(settings: Settings) -> LoadedConfig:
    return load_config(settings.config) if settings.config else default_config()


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.server import UnsafeBind, serve  # uvicorn and backends load only to serve

    try:
        settings = _settings(args)
    except ValidationError as exc:
        print(f"interlock: bad setting: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = _load(settings)
        return serve(config, settings)
    except (ConfigError, UnsafeBind) as exc:
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="interlock", description="An OpenAI-compatible LLM gateway.")
    p.add_argument("--version", action="version", version=f"interlock {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the gateway (no config: the embedded SmolLM2 model)")
    s.add_argument("--config", "-c", help="routing YAML (env INTERLOCK_CONFIG)")
    s.add_argument("--host", help="bind address (env INTERLOCK_HOST, default 127.0.0.1)")
    s.add_argument("--port", "-p", type=int, help="port (env INTERLOCK_PORT, default 8080)")
    s.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    s.add_argument("--allow-unauthenticated", action="store_true",
                   help="serve beyond loopback with no client keys configured")
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("check", help="validate a routing YAML; prints each problem with its path")
    c.add_argument("path")
    c.set_defaults(func=cmd_check)

    h = sub.add_parser("hash-key", help="print the sha256 of a client key for auth.keys[].sha256")
    h.add_argument("key", nargs="?", help="the key (read from stdin if omitted)")
    h.set_defaults(func=cmd_hash_key)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    os.environ.setdefault("PYTHONFAULTHANDLER", "1")
    sys.exit(args.func(args))
