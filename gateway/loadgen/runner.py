"""Closed and open loop, over one process or several.

- closed loop: ``concurrency`` users, each sending its session's rounds one after another and
  starting a new session when one ends;
- open loop: sessions arrive at ``rate`` a second (Poisson, constant, or a trace's timestamps),
  each running its rounds in turn; at most ``cap`` requests are in flight, and an arrival beyond
  that waits for a slot (its latency counts from when it is sent).

A run stops starting requests at ``duration_s`` or after ``requests``; what is in flight finishes.
``workers`` > 1 splits the users, the rate and the request count over that many processes, each
with its own event loop and connection pool. Each process measures the CPU it used: when one is
near a full core the tool, not the target, may be what the figures show.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from gateway.loadgen.client import Record, send
from gateway.loadgen.workload import Session, Workload

#: a process above this share of one core is taken to be the bottleneck
CPU_BOUND = 0.85


@dataclass(slots=True)
class Plan:
    url: str  # the OpenAI base URL, e.g. http://127.0.0.1:8080/v1
    workload: Workload
    concurrency: int | None = None  # closed loop
    rate: float | None = None  # open loop: sessions a second
    arrivals: str = "poisson"  # poisson | constant | trace
    cap: int = 256  # open loop: most requests in flight
    duration_s: float | None = None
    requests: int | None = None
    api_key: str | None = None
    read_timeout_s: float = 60.0
    workers: int = 1

    def __post_init__(self) -> None:
        open_loop = self.rate is not None or self.arrivals == "trace"
        if (self.concurrency is not None) == open_loop:
            raise ValueError("give a concurrency (closed loop) or a rate (open loop), one of them")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("the rate must be above 0")
        if self.duration_s is None and self.requests is None and self.arrivals != "trace":
            raise ValueError("give a duration or a number of requests (a trace replay ends by itself)")
        if self.arrivals not in ("poisson", "constant", "trace"):
            raise ValueError(f"arrivals must be poisson, constant or trace, not {self.arrivals!r}")

    @property
    def point(self) -> dict[str, float | int | None]:
        return {
            "max_concurrency": self.concurrency if self.rate is None else self.cap,
            "request_rate": self.rate,
        }

    def share(self, worker: int) -> Plan:
        """This worker's part of the load."""
        n = self.workers

        def split(total: int | None) -> int | None:
            return None if total is None else total // n + (worker < total % n)

        return Plan(
            url=self.url,
            workload=self.workload,
            concurrency=split(self.concurrency),
            rate=None if self.rate is None else self.rate / n,
            arrivals=self.arrivals,
            cap=max(1, split(self.cap) or 1),
            duration_s=self.duration_s,
            requests=split(self.requests),
            api_key=self.api_key,
            read_timeout_s=self.read_timeout_s,
            workers=1,
        )


@dataclass(slots=True)
class PointResult:
    plan: Plan
    records: list[Record]
    duration_s: float
    cpu_s: list[float] = field(default_factory=list)  # one per process

    @property
    def cpu_share(self) -> float:
        """The busiest process's share of one core."""
        return max(self.cpu_s, default=0.0) / self.duration_s if self.duration_s else 0.0

    @property
    def client_bound(self) -> bool:
        return self.cpu_share >= CPU_BOUND


Tick = Callable[[], None]


def run(plan: Plan, tick: Tick | None = None) -> PointResult:
    """Run one point of the sweep: in this process, or split over ``plan.workers`` processes."""
    if plan.workers <= 1:
        return asyncio.run(_run(plan, 0, tick or _nothing))
    context = multiprocessing.get_context("spawn")
    done = context.Value("i", 0)
    with ProcessPoolExecutor(plan.workers, mp_context=context, initializer=_init, initargs=(done,)) as pool:
        futures = [pool.submit(_worker, plan.share(i), i) for i in range(plan.workers)]
        seen = 0
        while not all(f.done() for f in futures):
            time.sleep(0.1)
            now = done.value
            for _ in range(now - seen):
                (tick or _nothing)()
            seen = now
        parts = [f.result() for f in futures]
    records = [r for part in parts for r in part.records]
    return PointResult(plan, records, max(p.duration_s for p in parts), [c for p in parts for c in p.cpu_s])


def _nothing() -> None:
    pass


_done: Any = None


def _init(done: Any) -> None:
    global _done
    _done = done


def _worker(plan: Plan, index: int) -> PointResult:
    def tick() -> None:
        with _done.get_lock():
            _done.value += 1

    return asyncio.run(_run(plan, index, tick))


async def _run(plan: Plan, worker: int, tick: Tick) -> PointResult:
    headers = {"content-type": "application/json"}
    if plan.api_key:
        headers["authorization"] = f"Bearer {plan.api_key}"
    url = plan.url.rstrip("/") + plan.workload.path
    sessions = plan.workload.sessions(worker)
    records: list[Record] = []
    budget = [plan.requests if plan.requests is not None else -1]
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
    cpu0 = time.process_time()
    started = time.perf_counter()
    deadline = started + plan.duration_s if plan.duration_s is not None else float("inf")

    def may_send() -> bool:
        if budget[0] == 0 or time.perf_counter() >= deadline:
            return False
        budget[0] -= 1
        return True

    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as http:

        async def run_session(session: Session, slots: asyncio.Semaphore | None) -> None:
            for planned in session:
                if not may_send():
                    return
                if slots is None:
                    record = await send(http, url, planned, headers, plan.read_timeout_s, started)
                else:
                    async with slots:
                        record = await send(http, url, planned, headers, plan.read_timeout_s, started)
                records.append(record)
                tick()

        if plan.concurrency is not None and plan.arrivals != "trace":

            async def user() -> None:
                while budget[0] != 0 and time.perf_counter() < deadline:
                    await run_session(next(sessions), None)

            await asyncio.gather(*(user() for _ in range(plan.concurrency)))
        else:
            slots = asyncio.Semaphore(plan.cap)
            tasks: set[asyncio.Task[None]] = set()
            for at, session in _arrivals(plan, sessions, worker):
                delay = started + at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if budget[0] == 0 or time.perf_counter() >= deadline:
                    break
                task = asyncio.create_task(run_session(session, slots))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)
    duration = time.perf_counter() - started
    return PointResult(plan, records, duration, [time.process_time() - cpu0])


def _arrivals(plan: Plan, sessions: Iterator[Session], worker: int) -> Iterator[tuple[float, Session]]:
    """(seconds from the start, session) for each arrival of the open loop."""
    if plan.arrivals == "trace":  # each recorded session once, at its first line's timestamp
        seen: set[int] = set()
        for session in sessions:
            if id(session) in seen:
                return
            seen.add(id(session))
            yield session[0].at_s or 0.0, session
        return
    assert plan.rate is not None and plan.rate > 0
    rng = random.Random(plan.workload.seed * 31 + worker)
    at = 0.0
    for session in sessions:
        yield at, session
        at += rng.expovariate(plan.rate) if plan.arrivals == "poisson" else 1.0 / plan.rate
