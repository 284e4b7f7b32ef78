"""Hot reload under load: a soak check, not a test.

Starts a fake OpenAI-compatible upstream (``tests.fakes.FakeUpstream``, whose ``long`` model streams
42 chunks over about two seconds) and ``interlock serve`` on a routing file, each a process of its
own. Then, for ``--duration`` seconds, ``--streams`` clients each stream one reply after another
while an operator task reloads the file ``--reloads-per-min`` times a minute (``POST
/admin/reload``, alternating two valid configs that add, remove, change and keep backends and
change routes' targets) and, between those, writes ``--corruptions`` random corruptions of the
valid file (random edits that ``interlock check`` rejects) and asks for a reload of each. The
table: streams truncated (no ``[DONE]``, an error event, or a broken body: must be 0), 5xx
replies (0), and routes lost after a rejected corruption (the models served and the config hash
must be the last good file's: 0).

Run from the repository root::

    .venv/bin/python benchmarks/reload/soak.py [--duration 120] [--streams 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks.common import SseStream, free_port  # noqa: E402
from gateway.config import ConfigError, load_config  # noqa: E402

#: the test fake, run as a process of its own (benchmarks do not import from tests/)
UPSTREAM = """
import threading
from tests.fakes import FakeUpstream
with FakeUpstream(port={port}):
    threading.Event().wait()
"""
MODELS = ("chat", "chat2", "chat3")


def configs(upstream: str) -> tuple[dict[str, Any], dict[str, Any]]:
    def long(total: float = 120) -> dict[str, object]:
        """A ``kind: openai`` backend on the fake's ``long`` model (42 chunks over ~2 s)."""
        return {
            "kind": "openai",
            "base_url": upstream,
            "model": "long",
            "timeouts": {"connect": 1.0, "first_token": 30, "total": total},
        }

    common = {"resilience": {"health_check": {"interval_s": 0}}}
    a = {
        "backends": {"kept": long(), "only_a": long(), "changed": long(120)},
        "models": {
            "chat": {"targets": ["kept"]},
            "chat2": {"targets": ["only_a"]},
            "chat3": {"targets": ["changed"]},
        },
        **common,
    }
    b = {
        "backends": {"kept": long(), "only_b": long(), "changed": long(121)},
        "models": {
            "chat": {"targets": ["kept", "only_b"], "policy": "least_busy"},
            "chat2": {"targets": ["only_b"]},
            "chat3": {"targets": ["changed"], "fallback": ["kept"]},
        },
        **common,
    }
    return a, b


def to_yaml(config: dict[str, Any]) -> str:
    return "# the soak's routing file\n" + yaml.safe_dump(config, sort_keys=False)


def corrupt(text: str, rng: random.Random) -> tuple[str, str]:
    """One random corruption of a valid file, and its kind."""
    lines = text.splitlines(keepends=True)
    i = rng.randrange(len(lines))
    kind = rng.choice(
        [
            "truncate",
            "delete span",
            "insert junk",
            "unknown target",
            "indent",
            "tab",
            "drop line",
            "bad number",
            "duplicate key",
            "bad kind",
        ]
    )
    if kind == "truncate":
        return text[: rng.randrange(1, len(text) - 1)], kind
    if kind == "delete span":
        start = rng.randrange(len(text) - 2)
        return text[:start] + text[start + rng.randrange(1, 40) :], kind
    if kind == "insert junk":
        at = rng.randrange(len(text))
        return text[:at] + rng.choice(["{", "]", ": :", "- [", "&x *y", '"', "@"]) + text[at:], kind
    if kind == "unknown target":
        return text.replace("- kept", "- kpet", 1), kind
    if kind == "indent":
        lines[i] = " " + lines[i]
    elif kind == "tab":
        lines[i] = "\t" + lines[i].lstrip(" ")
    elif kind == "drop line":
        del lines[i]
    elif kind == "bad number":
        return text.replace("first_token: 30", "first_token: soon", 1), kind
    elif kind == "duplicate key":
        return text.replace("models:", "models: {}\nmodels:", 1), kind
    elif kind == "bad kind":
        return text.replace("kind: openai", "kind: openia", 1), kind
    return "".join(lines), kind


def valid(path: Path, text: str) -> bool:
    """Whether ``interlock check`` accepts ``text``."""
    path.write_text(text)
    try:
        load_config(path)
    except ConfigError:
        return False
    return True


@dataclass
class Tally:
    started: int = 0
    whole: int = 0
    truncated: int = 0
    status_5xx: int = 0
    other_status: int = 0
    other_length: int = 0
    reloads_ok: int = 0
    reloads_bad: int = 0
    rejected: int = 0
    accepted: int = 0
    routes_lost: int = 0
    valid_draws: int = 0
    hash_changed: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    #: why streams were truncated: the error event's code, or what the client saw
    reasons: dict[str, int] = field(default_factory=dict)

    def truncation(self, reason: str) -> None:
        self.truncated += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1


async def streamer(http: aiohttp.ClientSession, url: str, n: int, stop_at: float, tally: Tally) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    i = n
    while time.monotonic() < stop_at:
        model = MODELS[i % len(MODELS)]
        i += 1
        tally.started += 1
        try:
            async with http.post(url + "/v1/chat/completions", json={**body, "model": model}) as response:
                if response.status >= 500:
                    tally.status_5xx += 1
                    continue
                if response.status != 200:
                    tally.other_status += 1
                    continue
                stream = SseStream()
                events = [event async for event in stream.events(response.content)]
        except (aiohttp.ClientError, json.JSONDecodeError) as exc:
            tally.truncation(type(exc).__name__)
            continue
        errors = [event["error"] for event in events if "error" in event]
        if errors:
            tally.truncation(errors[0].get("code") or "error")
        elif not stream.done:
            tally.truncation("no [DONE]")
        else:
            tally.whole += 1
            mores = sum(
                (choice.get("delta") or {}).get("content") == " more"
                for event in events
                for choice in event.get("choices") or ()
            )
            tally.other_length += mores != 40


async def operator(
    http: aiohttp.ClientSession,
    url: str,
    path: Path,
    good: tuple[dict[str, Any], ...],
    args: argparse.Namespace,
    tally: Tally,
) -> None:
    rng = random.Random(args.seed)
    start = time.monotonic()
    every = 60 / args.reloads_per_min
    events = [(k * every, "reload") for k in range(1, int(args.duration / every) + 1)]
    gap = args.duration / (args.corruptions + 1)
    events += [(k * gap, "corrupt") for k in range(1, args.corruptions + 1)]
    current = 0

    async def state() -> tuple[set[str], str]:
        async with http.get(url + "/v1/models") as r:
            served = {m["id"] for m in (await r.json())["data"]}
        async with http.get(url + "/admin/config") as r:
            return served, (await r.json())["hash"]

    async def put(text: str) -> tuple[int, dict[str, Any]]:
        await asyncio.to_thread(path.write_text, text)
        async with http.post(url + "/admin/reload") as r:
            return r.status, await r.json()

    _, good_hash = await state()
    for at, what in sorted(events):
        await asyncio.sleep(max(0.0, start + at - time.monotonic()))
        if what == "reload":
            current = 1 - current
            status, result = await put(to_yaml(good[current]))
            ok = status == 200 and result["status"] == "ok"
            tally.reloads_ok += ok
            tally.reloads_bad += not ok
            good_hash = result.get("hash", good_hash)
            continue
        # a corruption that happens to leave a valid file (a dropped `policy:` line, a timeout cut
        # from 120 to 1) is a config change, not a corruption: drawn again, and counted
        while True:
            text, kind = corrupt(to_yaml(good[current]), rng)
            if not await asyncio.to_thread(valid, path.with_name("draw.yaml"), text):
                break
            tally.valid_draws += 1
        tally.kinds[kind] = tally.kinds.get(kind, 0) + 1
        status, result = await put(text)
        if status == 400:
            tally.rejected += 1
            served, served_hash = await state()
            tally.routes_lost += len(set(good[current]["models"]) - served)
            tally.hash_changed += served_hash != good_hash
        else:  # the corruption happened to be a valid file: it is in force; put the good one back
            tally.accepted += 1
            await put(to_yaml(good[current]))


def table(args: argparse.Namespace, tally: Tally, config_state: dict[str, Any]) -> str:
    rows = [
        ("streams started", tally.started, ""),
        ("streams finished whole", tally.whole, ""),
        ("**streams truncated**", tally.truncated, "must be 0"),
        ("**5xx replies**", tally.status_5xx, "must be 0"),
        ("other non-200 replies", tally.other_status, "must be 0"),
        ("whole replies of another length", tally.other_length, "must be 0"),
        ("valid reloads (ok)", tally.reloads_ok, f"of {int(args.duration * args.reloads_per_min / 60)}"),
        ("valid reloads not ok", tally.reloads_bad, "must be 0"),
        ("corruptions rejected (400)", tally.rejected, f"of {args.corruptions}"),
        ("corruptions accepted", tally.accepted, "must be 0"),
        (
            "random edits that left a valid file",
            tally.valid_draws,
            "not corruptions (`interlock check` passes): drawn again",
        ),
        ("**routes lost after a rejected corruption**", tally.routes_lost, "must be 0"),
        ("config hash changed by a rejected corruption", tally.hash_changed, "must be 0"),
    ]
    lines = ["| | count | |", "|---|---:|---|", *(f"| {a} | {b} | {c} |" for a, b, c in rows)]
    lines.append("")
    lines.append("corruption kinds: " + ", ".join(f"{k} {v}" for k, v in sorted(tally.kinds.items())))
    if tally.reasons:
        lines.append("truncations by reason: " + ", ".join(f"{k} {v}" for k, v in tally.reasons.items()))
    lines.append(f"gateway's own counts (GET /admin/config results): {json.dumps(config_state['results'])}")
    return "\n".join(lines)


async def run(args: argparse.Namespace, url: str, path: Path, good: tuple[dict[str, Any], ...]) -> None:
    tally = Tally()
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        stop_at = time.monotonic() + args.duration
        streams = [asyncio.create_task(streamer(http, url, n, stop_at, tally)) for n in range(args.streams)]
        await operator(http, url, path, good, args, tally)
        await asyncio.gather(*streams)
        async with http.get(url + "/admin/config") as r:
            config_state = await r.json()
    print(
        f"{args.streams} live streams (FakeUpstream `long`, ~2 s each) for {args.duration:g} s, "
        f"{args.reloads_per_min:g} reloads a minute alternating two valid configs, "
        f"{args.corruptions} random corruptions (seed {args.seed})\n"
    )
    print(table(args, tally, config_state))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=120)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--reloads-per-min", type=float, default=20)
    parser.add_argument("--corruptions", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "INTERLOCK_RELOAD_WATCH": "0",
        "INTERLOCK_SHUTDOWN_DELAY_S": "0",
    }
    up_port, gw_port = free_port(), free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-c", UPSTREAM.format(port=up_port)], cwd=REPO, env=env, stderr=subprocess.DEVNULL
    )  # aiohttp logs each client gone
    good = configs(f"http://127.0.0.1:{up_port}/v1")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "routing.yaml"
        path.write_text(to_yaml(good[0]))
        log = open(Path(tmp) / "gateway.log", "wb")  # closed below
        gateway = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; from gateway.cli import main; main(sys.argv[1:])",
                "serve",
                "--config",
                str(path),
                "--port",
                str(gw_port),
                "--log-level",
                "warning",
            ],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{gw_port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    with urllib.request.urlopen(url + "/health/ready", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline or gateway.poll() is not None:
                    raise SystemExit("the gateway did not start: " + (Path(tmp) / "gateway.log").read_text())
                time.sleep(0.2)
            asyncio.run(run(args, url, path, good))
        finally:
            gateway.terminate()
            upstream.terminate()
            gateway.wait(30)
            upstream.wait(10)
            log.close()
            errors = [
                line
                for line in (Path(tmp) / "gateway.log").read_text().splitlines()
                if " ERROR " in line or "Traceback" in line
            ]
            print(f"\ngateway log: {len(errors)} ERROR line(s)" + "".join(f"\n    {e}" for e in errors[:5]))


if __name__ == "__main__":
    main()
