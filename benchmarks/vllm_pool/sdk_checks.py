"""The official ``openai`` SDK against the gateway in front of real vLLM servers, and a kill test.

    PYTHONPATH=/tmp/site:. python3 benchmarks/vllm_pool/sdk_checks.py                 # SDK checks
    PYTHONPATH=/tmp/site:. python3 benchmarks/vllm_pool/sdk_checks.py --only-kill \\
        --kill-pid-file /tmp/v2.pid                                                    # kill test

A gateway (``routing: auto``, every other knob at its default) is started in front of
``--endpoints``. Each SDK check prints ``PASS name: detail`` or ``FAIL name: why``; the SDK never
retries (``max_retries=0``), so what is checked is the gateway's own answer:

- sync and async chat, streamed and not; ``include_usage`` ends with a chunk without choices;
- completions, streamed and not;
- embeddings on a generative pool: a 400;
- a prompt over the context, streamed or not, and ``max_tokens`` over it: 400s;
- fields the gateway does not know (vLLM's ``ignore_eos``, ``top_k``, ``return_token_ids`` and a
  made-up one) pass through: the request succeeds; whether vLLM honoured ``return_token_ids``
  is printed as INFO, since only a real vLLM does.

The kill test (``--kill-pid-file``): ``--kill-requests`` (60) non-streaming requests start
spread over ``--kill-window`` seconds; just before the middle one starts, the server whose pid
the file names is killed with SIGKILL (its whole process group when it leads one, as
start_servers.sh's setsid makes it: vLLM's engine core is a child process and must die too, as
in a real crash). About half the requests are then in flight, some on the dying server, and the
other half arrive after it is gone. Every one must succeed: the pool retries a request whose
endpoint failed on another one, and ejects the dead endpoint. Counts print either way.

Exits 1 if anything failed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import openai
import poolkit

QUESTION: list[Any] = [{"role": "user", "content": "Name three colors."}]
IGNORE_EOS = {"ignore_eos": True}  # a dummy-weight model would otherwise stop at random


class Checks:
    def __init__(self) -> None:
        self.failed: list[str] = []
        self.passed = 0

    def record(self, name: str, ok: bool, detail: str) -> None:
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
        if ok:
            self.passed += 1
        else:
            self.failed.append(name)

    def run(self, name: str, check: Callable[[], str]) -> None:
        try:
            self.record(name, True, check())
        except Exception as exc:  # any failure of a check is that check's FAIL, not the script's end
            self.record(name, False, f"{type(exc).__name__}: {exc}"[:500])
            traceback.print_exc(limit=3, file=sys.stdout)

    def run_async(self, name: str, check: Callable[[], Awaitable[str]]) -> None:
        self.run(name, lambda: asyncio.run(check()))


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def tokens(reply: Any) -> int | None:
    """The reply's completion tokens, from its usage; None without usage."""
    return reply.usage.completion_tokens if reply.usage is not None else None


def expect_400(call: Callable[[], object], code: str | None = None) -> str:
    try:
        call()
    except openai.BadRequestError as exc:
        expect(exc.status_code == 400, f"status {exc.status_code}")
        if code is not None:
            expect(exc.code == code, f"code {exc.code!r}, wanted {code!r} ({exc.message[:200]})")
        return f"400 {exc.code}: {exc.message[:120]}"
    raise AssertionError("no error: the request succeeded")


# --- the SDK checks ------------------------------------------------------------------------------


def sdk_checks(url: str, model: str, checks: Checks) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    aclient_args: dict[str, Any] = {
        "base_url": url + "/v1",
        "api_key": "unused",
        "max_retries": 0,
        "timeout": 120,
    }

    def models() -> str:
        ids = [m.id for m in client.models.list().data]
        expect(model in ids, f"{model} not in {ids}")
        return f"models: {', '.join(ids)}"

    def chat() -> str:
        raw = client.chat.completions.with_raw_response.create(
            model=model,
            messages=QUESTION,
            max_tokens=16,
            temperature=0,
            extra_body=IGNORE_EOS,
            extra_headers={"x-interlock-session": "sdk-check"},
        )
        backend = raw.headers.get("x-interlock-backend")
        expect(backend == "pool", f"x-interlock-backend: {backend}")
        completion = raw.parse()
        choice = completion.choices[0]
        expect(isinstance(choice.message.content, str), "no content")
        expect(choice.finish_reason == "length", f"finish_reason {choice.finish_reason}")
        expect(tokens(completion) == 16, f"usage {completion.usage}")
        return f"16 tokens, {choice.message.content[:40]!r}"

    def chat_stream() -> str:
        chunks = list(
            client.chat.completions.create(
                model=model,
                messages=QUESTION,
                max_tokens=16,
                temperature=0,
                stream=True,
                extra_body=IGNORE_EOS,
            )
        )
        expect(bool(chunks) and chunks[0].choices[0].delta.role == "assistant", "first chunk carries no role")
        last = [c for c in chunks if c.choices][-1]
        expect(last.choices[0].finish_reason == "length", f"finish_reason {last.choices[0].finish_reason}")
        expect(all(c.usage is None for c in chunks), "usage without include_usage")
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return f"{len(chunks)} chunks, {text[:40]!r}"

    def include_usage() -> str:
        chunks = list(
            client.chat.completions.create(
                model=model,
                messages=QUESTION,
                max_tokens=16,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body=IGNORE_EOS,
            )
        )
        expect(chunks[-1].choices == [], "the last chunk has choices")
        usage = chunks[-1].usage
        expect(usage is not None and usage.completion_tokens == 16, f"usage {usage}")
        expect(all(c.usage is None for c in chunks[:-1]), "usage before the last chunk")
        assert usage is not None
        return f"last chunk: no choices, usage {usage.prompt_tokens}+{usage.completion_tokens}"

    async def async_chat() -> str:
        async with openai.AsyncOpenAI(**aclient_args) as aclient:

            async def plain() -> int:
                completion = await aclient.chat.completions.create(
                    model=model, messages=QUESTION, max_tokens=12, temperature=0, extra_body=IGNORE_EOS
                )
                expect(completion.usage is not None and completion.usage.completion_tokens == 12, "usage")
                return 12

            async def streamed() -> int:
                stream = await aclient.chat.completions.create(
                    model=model,
                    messages=QUESTION,
                    max_tokens=12,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_body=IGNORE_EOS,
                )
                chunks = [c async for c in stream]
                usage = chunks[-1].usage
                expect(
                    chunks[-1].choices == [] and usage is not None and usage.completion_tokens == 12,
                    f"last chunk {chunks[-1]}",
                )
                return 12

            done = await asyncio.gather(plain(), plain(), streamed(), streamed())
            return f"{len(done)} concurrent (2 plain, 2 streamed), {sum(done)} tokens"

    def completions() -> str:
        completion = client.completions.create(
            model=model, prompt="The sky is", max_tokens=8, temperature=0, extra_body=IGNORE_EOS
        )
        expect(isinstance(completion.choices[0].text, str), "no text")
        expect(tokens(completion) == 8, f"usage {completion.usage}")
        chunks = list(
            client.completions.create(
                model=model,
                prompt="The sky is",
                max_tokens=6,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body=IGNORE_EOS,
            )
        )
        expect(chunks[-1].choices == [] and chunks[-1].usage is not None, "no usage chunk")
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        return f"{completion.choices[0].text[:30]!r}; streamed {len(chunks)} chunks {text[:30]!r}"

    def embeddings() -> str:
        return expect_400(lambda: client.embeddings.create(model=model, input="hello"))

    def over_context() -> str:
        words: list[Any] = [{"role": "user", "content": "word " * 10_000}]
        plain = expect_400(
            lambda: client.chat.completions.create(model=model, messages=words, max_tokens=8),
            "context_length_exceeded",
        )
        expect_400(
            lambda: client.chat.completions.create(model=model, messages=words, max_tokens=8, stream=True),
            "context_length_exceeded",
        )
        expect_400(
            lambda: client.chat.completions.create(model=model, messages=QUESTION, max_tokens=100_000),
            "context_length_exceeded",
        )
        return f"prompt (plain and streamed) and max_tokens: {plain}"

    def unknown_fields() -> str:
        completion = client.chat.completions.create(
            model=model,
            messages=QUESTION,
            max_tokens=8,
            temperature=0,
            extra_body={
                "ignore_eos": True,
                "top_k": 5,
                "repetition_penalty": 1.05,
                "min_tokens": 2,
                "return_token_ids": True,
                "interlock_check_unknown_field": "x",
            },
        )
        expect(tokens(completion) == 8, f"usage {completion.usage}")
        extra = completion.choices[0].model_extra or {}
        honoured = isinstance(extra.get("token_ids"), list)
        print(f"INFO vLLM honoured return_token_ids (only a real vLLM does): {'yes' if honoured else 'no'}")
        return "accepted ignore_eos, top_k, repetition_penalty, min_tokens, return_token_ids, a made-up field"

    checks.run("models", models)
    checks.run("sync chat", chat)
    checks.run("sync chat stream", chat_stream)
    checks.run("stream include_usage", include_usage)
    checks.run_async("async chat + stream", async_chat)
    checks.run("completions", completions)
    checks.run("embeddings -> 400", embeddings)
    checks.run("over-context -> 400", over_context)
    checks.run("unknown fields pass", unknown_fields)
    client.close()


# --- the kill test -------------------------------------------------------------------------------


def server_pid(pid_file: str, endpoint: str) -> int:
    """The pid in the file; without the file, the oldest process whose command line has the port."""
    if os.path.exists(pid_file):
        with open(pid_file, encoding="utf-8") as f:
            return int(f.read().strip())
    port = urlsplit(endpoint).port
    found = subprocess.run(
        ["pgrep", "-o", "-f", "--", f"--port {port}"], capture_output=True, text=True, check=False
    ).stdout.split()
    if not found:
        raise RuntimeError(f"no {pid_file} and no process with '--port {port}'")
    return int(found[0])


def kill_server(pid: int) -> str:
    # The whole process group when the server leads one (setsid): vLLM's engine core is a separate
    # process, and a crash takes both; killing only the API server would leave the GPU memory held.
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
            return f"SIGKILL to process group {pid}"
        os.kill(pid, signal.SIGKILL)
        return f"SIGKILL to pid {pid}"
    except ProcessLookupError:
        return f"pid {pid} was already gone"


async def kill_test(
    gateway: poolkit.Gateway, model: str, pid: int, endpoint: str, args: argparse.Namespace, checks: Checks
) -> None:
    n, window = args.kill_requests, args.kill_window
    started = finished = 0
    in_flight_at_kill = -1
    outcomes: list[tuple[bool, float, str]] = []
    kill_note = ""
    async with openai.AsyncOpenAI(
        base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=args.request_timeout
    ) as client:

        async def one(i: int) -> None:
            nonlocal started, finished, in_flight_at_kill, kill_note
            await asyncio.sleep(i * window / n)
            if i == n // 2:
                # the pool's own count says how many are on the server about to die: those are the
                # requests its retry must rescue
                on_it = [
                    e["in_flight"]
                    for e in await asyncio.to_thread(gateway.pool_endpoints)
                    if e["url"].rstrip("/") == endpoint
                ]
                in_flight_at_kill = started - finished
                kill_note = kill_server(pid)
                print(
                    f"kill: {kill_note} ({endpoint}) with {in_flight_at_kill} requests in flight, "
                    f"{on_it[0] if on_it else '?'} of them there; {finished} done",
                    flush=True,
                )
            started += 1
            t = time.perf_counter()
            try:
                completion = await client.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": f"Request {i}: tell a long story."}],
                    max_tokens=args.kill_max_tokens,
                    temperature=0,
                    extra_body=IGNORE_EOS,
                )
                ok = completion.choices[0].finish_reason == "length"
                why = "" if ok else f"finish_reason {completion.choices[0].finish_reason}"
                outcomes.append((ok, time.perf_counter() - t, why))
            except openai.OpenAIError as exc:
                outcomes.append((False, time.perf_counter() - t, f"{type(exc).__name__}: {exc}"[:300]))
            finally:
                finished += 1

        await asyncio.gather(*(one(i) for i in range(n)))

    status, _ = poolkit.http_get(endpoint + "/health", timeout=2)
    ready, _ = poolkit.http_get(gateway.url + "/health/ready", timeout=5)
    pool = gateway.pool_endpoints()
    failures = [o for o in outcomes if not o[0]]
    latencies = [o[1] for o in outcomes]
    print(
        f"kill test: {len(outcomes)} requests, {len(outcomes) - len(failures)} ok, {len(failures)} failed; "
        f"{in_flight_at_kill} in flight at the kill; latency p50 {statistics.median(latencies):.2f}s "
        f"max {max(latencies):.2f}s",
        flush=True,
    )
    print(f"after: killed server GET /health -> {status or 'no answer'}; gateway /health/ready -> {ready}")
    for e in pool:
        print(
            f"  pool endpoint {e['url']}: healthy {e['healthy']} ({e['reason'] or 'ok'}), "
            f"served {e['served']}, in flight {e['in_flight']}"
        )
    for failure in failures[:5]:
        print(f"  failure: {failure[2]}")
    checks.record(
        "kill test: no request failed",
        not failures and len(outcomes) == n,
        f"{len(outcomes) - len(failures)}/{n} ok, {in_flight_at_kill} in flight at the kill",
    )
    checks.record("kill test: killed server is down", status == 0, f"GET /health -> {status or 'no answer'}")
    checks.record("kill test: gateway still ready", ready == 200, f"/health/ready -> {ready}")
    dead = [e for e in pool if e["url"].rstrip("/") == endpoint]
    checks.record(
        "kill test: the pool ejected it",
        bool(dead) and not dead[0]["healthy"],
        f"{dead[0]['url']} healthy={dead[0]['healthy']}" if dead else "endpoint not listed",
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--endpoints", default=poolkit.DEFAULT_ENDPOINTS, help="comma-separated vLLM base URLs")
    p.add_argument("--model", default="llama8b")
    p.add_argument("--kill-pid-file", help="run the kill test on the server whose pid this file holds")
    p.add_argument("--kill-endpoint", help="the URL of that server (default: the last of --endpoints)")
    p.add_argument("--only-kill", action="store_true", help="skip the SDK checks")
    p.add_argument("--kill-requests", type=int, default=60)
    p.add_argument("--kill-window", type=float, default=4.0, help="seconds over which the requests start")
    p.add_argument("--kill-max-tokens", type=int, default=128)
    p.add_argument("--request-timeout", type=float, default=120.0)
    args = p.parse_args(argv)
    if args.only_kill and not args.kill_pid_file:
        p.error("--only-kill needs --kill-pid-file")
    return args


def main() -> None:
    args = parse_args()
    endpoints = poolkit.endpoint_list(args.endpoints)
    kill_endpoint = (args.kill_endpoint or endpoints[-1]).rstrip("/")
    checks = Checks()
    t0 = time.monotonic()
    config = poolkit.pool_config(endpoints, args.model, "auto")
    name = "kill-test" if args.only_kill else "sdk-checks"  # its own log file under $OUT
    with poolkit.gateways({name: config}, poolkit.out_dir()) as running:
        gateway = running[name]
        print(
            f"gateway {gateway.url} in front of {', '.join(endpoints)} (openai {openai.__version__})",
            flush=True,
        )
        if not args.only_kill:
            sdk_checks(gateway.url, args.model, checks)
        if args.kill_pid_file:
            pid = server_pid(args.kill_pid_file, kill_endpoint)
            asyncio.run(kill_test(gateway, args.model, pid, kill_endpoint, args, checks))
    print(
        f"{checks.passed} passed, {len(checks.failed)} failed in {time.monotonic() - t0:.1f}s"
        + (f": {', '.join(checks.failed)}" if checks.failed else ""),
        flush=True,
    )
    sys.exit(1 if checks.failed else 0)


if __name__ == "__main__":
    main()
