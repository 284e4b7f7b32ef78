"""Routing policies compared on one simulated workload over a mixed pool of fake backends.

The real ``gateway.router.Router`` (its breakers, live stats and retry budget included)
routes the same seeded request sequence once per policy in ``policies.POLICIES``, over
three in-process fake backends that only sleep:

    flaky           $0.15 / $0.60 per Mtok   TTFT ~150 ms, 12 ms/token; 25% of requests fail,
                                             and a 20 s outage mid-run fails all (and cuts its streams)
    cheap-slow      $0.05 / $0.10 per Mtok   TTFT ~400 ms + 0.5 ms per prompt token, 30 ms/token;
                                             16 requests at once, the rest queue for a slot
    fast-expensive  $2.50 / $10.00 per Mtok  TTFT ~80 ms + 0.05 ms per prompt token, 8 ms/token

The route lists them in that order (flaky first), 3 attempts, no fallback, no load shedding
(no ``max_in_flight``, the gateway's default); ``slo`` gets a route TTFT budget (``--slo-ms``).
Every request streams: TTFT, the headline figure, is the time from the request's arrival to
the first chunk the router hands back, retries and backoff included.

Time. By default the run uses a virtual clock: an event loop whose clock jumps to the next
timer whenever every task is asleep, so a simulated millisecond costs no real time and every
figure is exact in simulated ms, the same on every run with the same seed, and unaffected by
other work on the machine (timer granularity and a busy CPU would skew real sleeps). The whole
comparison takes seconds of CPU. ``--time-scale S`` instead runs on real time, sleeping S real
seconds per simulated second (0.1: 1 simulated ms = 0.1 real ms), as a cross-check of the
virtual loop: the routing should come out the same, with TTFTs a little higher, since each real
sleep overshoots by up to a real millisecond or so, which the scale magnifies (1 ms at 0.1 is 10
simulated ms). Keep ``--requests`` small there: a policy's run lasts about requests / rate * S.
Either way the router, breakers, stats and retry budget read the simulated clock, so their
windows and cool-downs (10 s budget window, 10 s breaker cool-down) are in simulated seconds.

Run from the repository root::

    .venv/bin/python benchmarks/policies/simulate.py [--requests 2000] [--rate 2] [--seed 1]

It prints a markdown table, a row per policy, and writes it to ``results.md`` beside this file.
This is a simulation, not a test: it asserts nothing about which policy should win.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import math
import random
import selectors
import shlex
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RESULTS = HERE / "results.md"

# The project is not installed into the venv: its packages import from the repository root.
sys.path.insert(0, str(REPO))

from backends.base import BackendRequest, BackendResponse, Health, Load, Price, Usage  # noqa: E402
from backends.errors import BackendUnavailable, InterlockError  # noqa: E402
from benchmarks.common import git_commit, percentile  # noqa: E402
from gateway.attempts import usage_from_tail  # noqa: E402
from gateway.breaker import CircuitBreaker  # noqa: E402
from gateway.retry_budget import RetryBudget  # noqa: E402
from gateway.router import Router  # noqa: E402
from gateway.snapshot import Route, Target  # noqa: E402
from gateway.stats import BackendStats  # noqa: E402
from policies import POLICIES  # noqa: E402
from policies.base import BackendView, Policy, PolicyContext, Ranked, RequestFacts  # noqa: E402

ROUTE = "mixed"
ATTEMPTS = 3
#: the router's defaults (gateway.config RetryConfig), in simulated seconds
BACKOFF_INITIAL_S = 0.05
BACKOFF_MAX_S = 2.0

#: tokens per SSE chunk after the first: a chunk per token would cost a loop wake-up per token
#: for nothing the router uses (it times the first chunk and reads the usage at the end)
CHUNK_TOKENS = 32
#: the share of prompts that are long (4k-8k tokens); the rest are lognormal around SHORT_PROMPT_MEDIAN
LONG_PROMPT_SHARE = 0.1
SHORT_PROMPT_MEDIAN = 300
#: the length a reply would run to unbounded (lognormal); max_tokens cuts it off
REPLY_MEDIAN = 200
OUTAGE_S = 20.0


# --- the pool -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Profile:
    """How one fake backend behaves; all times in simulated ms."""

    name: str
    label: str  # short, for the share column
    price: Price
    ttft_base_ms: float
    ttft_per_prompt_token_ms: float
    tpot_ms: float
    #: requests served at once; the rest wait for a slot (None: unbounded, like a big hosted API)
    capacity: int | None = None
    failure_rate: float = 0.0
    #: whether the mid-run outage window applies to it
    outage: bool = False


POOL: tuple[Profile, ...] = (  # the route's target order: what ``ordered`` tries first
    Profile(
        "flaky",
        "flaky",
        Price(input_per_mtok=0.15, output_per_mtok=0.60),
        ttft_base_ms=150,
        ttft_per_prompt_token_ms=0.0,
        tpot_ms=12,
        failure_rate=0.25,
        outage=True,
    ),
    Profile(
        "cheap-slow",
        "cheap",
        Price(input_per_mtok=0.05, output_per_mtok=0.10),
        ttft_base_ms=400,
        ttft_per_prompt_token_ms=0.5,
        tpot_ms=30,
        capacity=16,
    ),
    Profile(
        "fast-expensive",
        "fast",
        Price(input_per_mtok=2.50, output_per_mtok=10.00),
        ttft_base_ms=80,
        ttft_per_prompt_token_ms=0.05,
        tpot_ms=8,
    ),
)

#: lognormal sigmas of the per-attempt noise (medians are the profile's figures)
TTFT_SIGMA = 0.3
TPOT_SIGMA = 0.1
#: a failing request answers its error after about this long; during the outage, refused at once
FAIL_AFTER_MS = 50.0
REFUSE_AFTER_MS = 5.0


class SimClock:
    """Simulated seconds since the run began, and sleeps in them, on whichever loop runs."""

    def __init__(self, real_per_sim: float) -> None:
        self.real_per_sim = real_per_sim
        self._loop: asyncio.AbstractEventLoop | None = None
        self._t0 = 0.0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._t0 = self._loop.time()

    def now(self) -> float:
        assert self._loop is not None, "start() first"
        return (self._loop.time() - self._t0) / self.real_per_sim

    async def sleep(self, sim_s: float) -> None:
        await asyncio.sleep(max(0.0, sim_s) * self.real_per_sim)

    async def sleep_until(self, sim_t: float) -> None:
        await self.sleep(sim_t - self.now())


@dataclass(frozen=True, slots=True)
class Job:
    """One client request of the workload; the same list goes to every policy."""

    index: int
    request_id: str
    arrival_s: float
    prompt_tokens: int
    max_tokens: int
    #: what the reply will run to, whichever backend writes it (max_tokens already applied)
    completion_tokens: int

    @property
    def long(self) -> bool:
        return self.prompt_tokens >= 4000


def make_workload(n: int, rate: float, seed: int) -> list[Job]:
    rng = random.Random(f"workload:{seed}")
    jobs: list[Job] = []
    t = 0.0
    for i in range(n):
        t += rng.expovariate(rate)  # Poisson arrivals
        if rng.random() < LONG_PROMPT_SHARE:
            prompt = rng.randint(4000, 8000)  # a pasted document, a long conversation
        else:
            prompt = min(4000, max(16, round(rng.lognormvariate(math.log(SHORT_PROMPT_MEDIAN), 0.9))))
        max_tokens = rng.randint(64, 512)
        reply = max(1, round(rng.lognormvariate(math.log(REPLY_MEDIAN), 0.6)))
        jobs.append(Job(i, f"req-{i:05d}", t, prompt, max_tokens, min(reply, max_tokens)))
    return jobs


def _chunk(payload: str) -> bytes:
    return f"data: {payload}\n\n".encode()


class FakeBackend:
    """A Backend (``backends.base``) that only sleeps, after the profile's latency model.

    Its randomness is drawn per (request, attempt) from a seed, not from a shared stream: the
    same request meets the same luck on the same backend under every policy (common random
    numbers), so policy differences are not drowned in sampling noise.
    """

    kind = "simulated"

    def __init__(
        self,
        profile: Profile,
        clock: SimClock,
        jobs: Mapping[str, Job],
        seed: int,
        outage: tuple[float, float] | None,
    ) -> None:
        self.name = profile.name
        self.profile = profile
        self._clock = clock
        self._jobs = jobs
        self._seed = seed
        self._outage = outage if profile.outage else None
        self._slots = asyncio.Semaphore(profile.capacity) if profile.capacity else None
        self._active = 0
        self._queued = 0
        self.peak_queued = 0
        #: attempts each request made here: the attempt number seeds that attempt's luck
        self.attempts: Counter[str] = Counter()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def health(self) -> Health:
        return Health(ok=True)

    def load(self) -> Load:
        # As the llama.cpp backend reports it: in_flight is what holds a slot, queued waits for one.
        return Load(in_flight=self._active, queued=self._queued, capacity=self.profile.capacity)

    def fatal(self) -> str | None:
        return None

    def describe(self) -> dict[str, object]:
        return {}

    async def complete(self, request: BackendRequest) -> BackendResponse:
        # Not used by the simulation (it streams); served from the stream so the protocol is whole.
        chunks = await self.stream(request)
        tail = b""
        async for chunk in chunks:
            tail = (tail + chunk)[-4096:]
        return BackendResponse(body=b"{}", usage=usage_from_tail(tail) or Usage())

    async def stream(self, request: BackendRequest) -> AsyncIterator[bytes]:
        job = self._jobs[request.request_id]
        self.attempts[job.request_id] += 1
        rng = random.Random(f"{self._seed}:{self.name}:{job.index}:{self.attempts[job.request_id]}")
        # Drawn in a fixed order, whichever are used, so one draw never shifts another.
        fails = rng.random() < self.profile.failure_rate
        fail_after = FAIL_AFTER_MS * rng.lognormvariate(0.0, 0.5)
        ttft_noise = rng.lognormvariate(0.0, TTFT_SIGMA)
        tpot_noise = rng.lognormvariate(0.0, TPOT_SIGMA)
        if self._in_outage(self._clock.now()):
            await self._clock.sleep(REFUSE_AFTER_MS / 1000)
            raise BackendUnavailable(f"{self.name}: connection refused (outage)")
        if fails:
            await self._clock.sleep(fail_after / 1000)
            raise BackendUnavailable(f"{self.name}: upstream returned 503")
        return self._generate(job, ttft_noise, tpot_noise)

    async def _generate(self, job: Job, ttft_noise: float, tpot_noise: float) -> AsyncIterator[bytes]:
        if self._slots is not None:
            waits = self._slots.locked()  # counted only when it really waits for a slot
            self._queued += waits
            self.peak_queued = max(self.peak_queued, self._queued)
            try:
                await self._slots.acquire()
            finally:
                self._queued -= waits
        self._active += 1
        try:
            p = self.profile
            await self._wait((p.ttft_base_ms + p.ttft_per_prompt_token_ms * job.prompt_tokens) * ttft_noise)
            yield _chunk('{"choices":[{"index":0,"delta":{"role":"assistant","content":"t"}}]}')
            left = job.completion_tokens - 1
            while left > 0:
                n = min(CHUNK_TOKENS, left)
                await self._wait(n * p.tpot_ms * tpot_noise)
                left -= n
                yield _chunk('{"choices":[{"index":0,"delta":{"content":"' + "t" * n + '"}}]}')
            usage = (
                f'"usage":{{"prompt_tokens":{job.prompt_tokens},'
                f'"completion_tokens":{job.completion_tokens},'
                f'"total_tokens":{job.prompt_tokens + job.completion_tokens}}}'
            )
            yield _chunk('{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],' + usage + "}")
            yield _chunk("[DONE]")
        finally:
            self._active -= 1
            if self._slots is not None:
                self._slots.release()

    def _in_outage(self, t: float) -> bool:
        return self._outage is not None and self._outage[0] <= t < self._outage[1]

    async def _wait(self, ms: float) -> None:
        """Sleep ``ms`` simulated ms, unless the outage begins meanwhile: then the connection drops
        at that instant (before the first chunk the router can retry it; after, it cannot)."""
        now = self._clock.now()
        if self._outage is not None and now < self._outage[0] < now + ms / 1000:
            await self._clock.sleep(self._outage[0] - now)
            raise BackendUnavailable(f"{self.name}: connection reset (outage)")
        await self._clock.sleep(ms / 1000)


# --- the virtual clock ----------------------------------------------------------------------------


class _SkippingSelector(selectors.DefaultSelector):
    """Never blocks: when the loop would wait for its next timer, the clock jumps there instead.

    The only file descriptor registered is the loop's self-pipe (no network in the simulation),
    so it is polled without waiting; a wait with no timer at all means every task is stuck.
    """

    def __init__(self, loop: VirtualClockLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        events: list[tuple[selectors.SelectorKey, int]] = super().select(0)
        if events or timeout == 0:
            return events
        if timeout is None:
            raise RuntimeError("simulation deadlock: every task waits and no timer is set")
        self._loop.now += timeout
        return []


class VirtualClockLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self.now = 0.0  # before super().__init__, which may read time()
        super().__init__(_SkippingSelector(self))

    def time(self) -> float:
        return self.now


# --- one policy's run -----------------------------------------------------------------------------


@dataclass(slots=True)
class Outcome:
    """One request as the client saw it."""

    ok: bool = False
    ttft_ms: float | None = None
    backend: str | None = None
    cost_usd: float = 0.0
    #: "before first byte: <code>" or "mid-stream: <code>"
    error: str | None = None
    waited_for_slot: bool = False


class _LogTally(logging.Handler):
    """Counts the router's log lines by template (it logs each failed attempt; printing them would
    be thousands of lines) and so learns how often the retry budget said no."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[str(record.msg)] += 1


class _BreakerLog:
    """How long each circuit spent other than closed (open or half-open), from its transitions."""

    def __init__(self, clock: SimClock) -> None:
        self._clock = clock
        self._since: dict[str, float] = {}
        self.not_closed_s: Counter[str] = Counter()

    def __call__(self, name: str, old: str, new: str) -> None:
        now = self._clock.now()
        if old == "closed":
            self._since[name] = now
        elif new == "closed":
            self.not_closed_s[name] += now - self._since.pop(name, now)

    def finish(self) -> None:
        for name in list(self._since):
            self.__call__(name, "open", "closed")


def _watching(policy: Policy, seen: Counter[str]) -> Policy:
    """The policy, counting the plans in which it listed flaky as demoted for its error rate
    (the data-driven policies do; the reason text is how a plan says so)."""

    def rank(
        candidates: Sequence[BackendView], request: RequestFacts, context: PolicyContext
    ) -> list[Ranked]:
        ranked = policy(candidates, request, context)
        seen["plans"] += 1
        seen["flaky demoted"] += any(r.name == "flaky" and "(demoted)" in r.reason for r in ranked)
        return ranked

    return rank


@dataclass(slots=True)
class PolicyRun:
    policy: str
    jobs: Sequence[Job]
    outcomes: list[Outcome]
    attempts: int
    budget_denials: int
    contract_breaks: int
    trips: dict[str, int]
    not_closed_s: dict[str, float]
    #: share of the plans that listed flaky last for its error rate
    flaky_demoted: float
    peak_queued: dict[str, int]
    makespan_s: float
    wall_s: float
    slo_ms: float


async def run_policy(
    policy: str, jobs: Sequence[Job], outage: tuple[float, float], args: argparse.Namespace, clock: SimClock
) -> PolicyRun:
    clock.start()
    seen: Counter[str] = Counter()
    # tenacity's backoff jitter draws from the module-level random, not the router's rng: seed it
    # too, or two runs of the same seed differ.
    random.seed(f"jitter:{args.seed}:{policy}")
    by_id = {job.request_id: job for job in jobs}
    backends = {p.name: FakeBackend(p, clock, by_id, args.seed, outage) for p in POOL}
    targets = tuple(
        Target(
            backend=backends[p.name],
            stats=BackendStats(p.name, clock=clock.now),
            breaker=CircuitBreaker(p.name, clock=clock.now),
            price=p.price,
        )
        for p in POOL
    )
    breakers = _BreakerLog(clock)
    for target in targets:
        target.breaker.listeners.append(breakers)
    route = Route(
        name=ROUTE,
        targets=targets,
        policy=policy,
        attempts=ATTEMPTS,
        ttft_slo_ms=args.slo_ms if policy == "slo" else None,
    )
    # The router's backoff sleeps on the loop's own clock (real seconds in --time-scale mode),
    # so its bounds are converted; everything else reads the simulated clock.
    router = Router(
        budget=RetryBudget(clock=clock.now),
        backoff_initial_s=BACKOFF_INITIAL_S * clock.real_per_sim,
        backoff_max_s=BACKOFF_MAX_S * clock.real_per_sim,
        rng=random.Random(f"router:{args.seed}"),
        clock=clock.now,
        policies={policy: _watching(POLICIES[policy], seen)},
    )

    tally = _LogTally()
    router_log = logging.getLogger("interlock.router")
    router_log.addHandler(tally)
    router_log.propagate = False
    router_log.setLevel(logging.DEBUG)

    outcomes = [Outcome() for _ in jobs]
    slots = asyncio.Semaphore(args.concurrency)

    async def client(job: Job) -> None:
        out = outcomes[job.index]
        out.waited_for_slot = slots.locked()
        async with slots:
            request = BackendRequest(
                endpoint="chat",
                request_id=job.request_id,
                stream=True,
                body={
                    "model": ROUTE,
                    "messages": [{"role": "user", "content": "..."}],
                    "max_tokens": job.max_tokens,
                    "stream": True,
                },
            )
            # The real prompt size, where the gateway estimates it from the body's bytes: the
            # comparison is of policies, not of the estimate.
            facts = RequestFacts(job.prompt_tokens, job.max_tokens, route.ttft_slo_ms)
            try:
                opened = await router.stream(route, request, facts)
            except InterlockError as exc:
                out.error = f"before first byte: {exc.code or exc.type}"
                return
            # From arrival, not from the router call: a wait for a client slot is the client's wait too.
            out.ttft_ms = (clock.now() - job.arrival_s) * 1000
            out.backend = opened.target.name
            tail = opened.first
            try:
                async for chunk in opened.rest:
                    tail = (tail + chunk)[-4096:]
            except InterlockError as exc:
                # Bytes reached the client: the router cannot retry, the answer is broken.
                out.error = f"mid-stream: {exc.code or exc.type}"
                return
            finally:
                await opened.rest.aclose()  # type: ignore[attr-defined]
            counts = usage_from_tail(tail)
            if counts is None:
                out.error = "no usage in stream"
                return
            out.ok = True
            # What the provider bills for the reply the client got; failed attempts bill nothing here.
            out.cost_usd = opened.target.cost_usd(counts)

    started = time.perf_counter()
    try:
        async with asyncio.TaskGroup() as group:
            for job in jobs:
                await clock.sleep_until(job.arrival_s)
                group.create_task(client(job))
    finally:
        router_log.removeHandler(tally)
    breakers.finish()
    return PolicyRun(
        policy=policy,
        jobs=jobs,
        outcomes=outcomes,
        attempts=sum(sum(b.attempts.values()) for b in backends.values()),
        budget_denials=tally.counts["retry budget exhausted for %s"],
        contract_breaks=tally.counts["backend %s broke its contract"],
        trips={t.name: int(t.breaker.snapshot()["trips"]) for t in targets},  # type: ignore[call-overload]
        not_closed_s={t.name: breakers.not_closed_s[t.name] for t in targets},
        flaky_demoted=seen["flaky demoted"] / max(1, seen["plans"]),
        peak_queued={b.name: b.peak_queued for b in backends.values()},
        makespan_s=clock.now(),
        wall_s=time.perf_counter() - started,
        slo_ms=args.slo_ms,
    )


def run_all(args: argparse.Namespace) -> tuple[list[PolicyRun], tuple[float, float], list[Job]]:
    jobs = make_workload(args.requests, args.rate, args.seed)
    middle = jobs[-1].arrival_s / 2
    outage = (middle - OUTAGE_S / 2, middle + OUTAGE_S / 2)
    virtual = args.time_scale == 0
    runs: list[PolicyRun] = []
    for policy in args.policies:
        clock = SimClock(1.0 if virtual else args.time_scale)
        factory: Callable[[], asyncio.AbstractEventLoop] = (
            VirtualClockLoop if virtual else asyncio.new_event_loop
        )
        with asyncio.Runner(loop_factory=factory) as runner:
            run = runner.run(run_policy(policy, jobs, outage, args, clock))
        runs.append(run)
        print(f"  {policy}: {run.wall_s:.1f} s wall, {run.makespan_s:.0f} s simulated", file=sys.stderr)
    return runs, outage, jobs


# --- figures --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    policy: str
    requests: int
    error_rate: float
    p50: float | None
    p99: float | None
    cost_per_1k: float
    share: dict[str, float]
    within_slo: float
    long_p50: float | None
    errors_before: int
    errors_mid: int
    attempts_per_request: float


def summarise(run: PolicyRun) -> Row:
    outs = run.outcomes
    n = len(outs)
    ok = [o for o in outs if o.ok]
    ttfts = [o.ttft_ms for o in ok if o.ttft_ms is not None]
    served = Counter(o.backend for o in ok)
    return Row(
        policy=run.policy,
        requests=n,
        error_rate=1 - len(ok) / n,
        p50=percentile(ttfts, 0.5),
        p99=percentile(ttfts, 0.99),
        cost_per_1k=sum(o.cost_usd for o in outs) / n * 1000,
        share={p.name: served[p.name] / len(ok) if ok else 0.0 for p in POOL},
        within_slo=sum(1 for o in ok if o.ttft_ms is not None and o.ttft_ms <= run.slo_ms) / n,
        long_p50=percentile(
            [
                o.ttft_ms
                for o, j in zip(outs, run.jobs, strict=True)
                if o.ok and j.long and o.ttft_ms is not None
            ],
            0.5,
        ),
        errors_before=sum(1 for o in outs if o.error and o.error.startswith("before")),
        errors_mid=sum(1 for o in outs if o.error and not o.error.startswith("before")),
        attempts_per_request=run.attempts / n,
    )


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def _share(row: Row) -> str:
    return " / ".join(f"{p.label} {row.share[p.name]:.0%}" for p in POOL)


def main_table(rows: Sequence[Row]) -> str:
    lines = [
        "| policy | requests | client error rate | TTFT p50 ms | TTFT p99 ms | cost per 1k requests (USD) "
        "| share per backend |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.policy} | {r.requests:,} | {r.error_rate:.2%} | {_ms(r.p50)} | {_ms(r.p99)} "
            f"| {r.cost_per_1k:.3f} | {_share(r)} |"
        )
    return "\n".join(lines)


def detail_table(rows: Sequence[Row], runs: Sequence[PolicyRun], slo_ms: float) -> str:
    lines = [
        f"| policy | attempts per request | retries refused by budget | flaky: breaker trips "
        "| flaky: circuit not closed, share of run | flaky: demoted, share of plans "
        f"| errors before first byte | streams cut mid-way | TTFT ≤ {slo_ms:g} ms (all requests) "
        "| TTFT p50 ms, 4k-8k prompts | cheap-slow peak queue | simulated duration s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r, run in zip(rows, runs, strict=True):
        lines.append(
            f"| {r.policy} | {r.attempts_per_request:.3f} | {run.budget_denials} | {run.trips['flaky']} "
            f"| {run.not_closed_s['flaky'] / run.makespan_s:.0%} | {run.flaky_demoted:.0%} "
            f"| {r.errors_before} | {r.errors_mid} | {r.within_slo:.1%} | {_ms(r.long_p50)} "
            f"| {run.peak_queued['cheap-slow']} | {run.makespan_s:,.0f} |"
        )
    return "\n".join(lines)


def interpretation(rows: Sequence[Row], runs: Sequence[PolicyRun], slo_ms: float) -> str:
    """The trade-offs, read off the numbers, so that they stay true when the parameters change."""
    cheapest = min(rows, key=lambda r: r.cost_per_1k)
    dearest = max(rows, key=lambda r: r.cost_per_1k)
    timed = [r for r in rows if r.p50 is not None and r.p99 is not None]
    fastest = min(timed, key=lambda r: r.p50 or 0.0)
    best_tail = min(timed, key=lambda r: r.p99 or 0.0)
    worst_tail = max(timed, key=lambda r: r.p99 or 0.0)
    ratio = dearest.cost_per_1k / cheapest.cost_per_1k if cheapest.cost_per_1k else math.inf
    parts = [
        f"Cost and first-token latency pull against each other: `{cheapest.policy}` is the cheapest at "
        f"${cheapest.cost_per_1k:.3f} per 1k requests with TTFT p50/p99 of {_ms(cheapest.p50)}/"
        f"{_ms(cheapest.p99)} ms, while `{dearest.policy}` pays {ratio:,.0f} times as much "
        f"(${dearest.cost_per_1k:.3f}).",
        f"The lowest p50 is `{fastest.policy}`'s ({_ms(fastest.p50)} ms), the tightest tail "
        f"`{best_tail.policy}`'s ({_ms(best_tail.p99)} ms p99) and the loosest `{worst_tail.policy}`'s "
        f"({_ms(worst_tail.p99)} ms, {worst_tail.share['cheap-slow']:.0%} of its replies from cheap-slow, "
        f"whose TTFT grows 0.5 ms per prompt token and whose 16 slots queue).",
    ]
    worst = max(rows, key=lambda r: r.error_rate)
    errors = sum(r.errors_before + r.errors_mid for r in rows)
    mid = sum(r.errors_mid for r in rows)
    parts.append(
        f"Three attempts hide flaky's failures from clients (at most {worst.error_rate:.2%} client errors, "
        f"`{worst.policy}`; {mid} of the {errors} client errors of all runs are streams cut after their "
        f"first byte by the outage, which no retry may replay); the failures are paid in TTFT instead."
    )
    flappy = max(runs, key=lambda run: run.not_closed_s["flaky"] / run.makespan_s)
    if flappy.not_closed_s["flaky"] > 0:
        parts.append(
            f"The breaker cuts deeper than the failures: flaky fails {POOL[0].failure_rate:.0%} of requests "
            f"outside a {OUTAGE_S:g} s outage, yet under `{flappy.policy}` its circuit was open or half-open "
            f"{flappy.not_closed_s['flaky'] / flappy.makespan_s:.0%} of the run "
            f"({flappy.trips['flaky']} trips), "
            f"sending its share to the next target."
        )
    demoting = max(runs, key=lambda run: run.flaky_demoted)
    if demoting.flaky_demoted > 0:
        parts.append(
            f"The data-driven policies listed flaky last, as failing, in up to {demoting.flaky_demoted:.0%} "
            f"of their plans (`{demoting.policy}`): a backend listed last gets no traffic to improve its "
            f"figures, so one early failure can keep it out until its outcomes age out."
        )
    slo = next((r for r in rows if r.policy == "slo"), None)
    quickest = max(rows, key=lambda r: r.within_slo)
    if slo is not None and slo is not quickest:
        parts.append(
            f"`slo` got {slo.within_slo:.1%} of requests a first token within {slo_ms:g} ms at "
            f"${slo.cost_per_1k:.3f} per 1k, against {quickest.within_slo:.1%} for `{quickest.policy}` at "
            f"${quickest.cost_per_1k:.3f}."
        )
    elif slo is not None:
        parts.append(
            f"`slo` got the most requests a first token within {slo_ms:g} ms "
            f"({slo.within_slo:.1%}), at ${slo.cost_per_1k:.3f} per 1k."
        )
    return " ".join(parts)


# --- output ---------------------------------------------------------------------------------------


def pool_table() -> str:
    lines = [
        "| backend | price in / out per Mtok | TTFT (median) | per output token | capacity | failures |",
        "|---|---|---|---|---|---|",
    ]
    for p in POOL:
        ttft = f"{p.ttft_base_ms:g} ms" + (
            f" + {p.ttft_per_prompt_token_ms:g} ms/prompt token" if p.ttft_per_prompt_token_ms else ""
        )
        fails = (f"{p.failure_rate:.0%}" if p.failure_rate else "none") + (
            f"; all during a {OUTAGE_S:g} s outage mid-run" if p.outage else ""
        )
        lines.append(
            f"| {p.name} | ${p.price.input_per_mtok:.2f} / ${p.price.output_per_mtok:.2f} | {ttft} "
            f"| {p.tpot_ms:g} ms | {p.capacity or 'unbounded'} | {fails} |"
        )
    return "\n".join(lines)


def report(
    args: argparse.Namespace, runs: Sequence[PolicyRun], outage: tuple[float, float], jobs: Sequence[Job]
) -> str:
    rows = [summarise(run) for run in runs]
    waited = sum(o.waited_for_slot for run in runs for o in run.outcomes)
    span = jobs[-1].arrival_s
    long_share = sum(j.long for j in jobs) / len(jobs)
    clock = (
        "virtual clock (simulated ms are exact; no real sleeping)"
        if args.time_scale == 0
        else f"real time, {args.time_scale:g} real s per simulated s"
    )
    command = shlex.join([".venv/bin/python", "benchmarks/policies/simulate.py", *sys.argv[1:]])
    return f"""# Routing policies over a mixed pool (simulation)

Each policy of `policies.POLICIES` routes the same {len(jobs):,} streamed requests through the real
`gateway.router.Router` (circuit breakers, live stats, retry budget: all at their defaults) over three
in-process fake backends, by `benchmarks/policies/simulate.py`. Figures are in simulated ms.

- date: {dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}
- command: `{command}`
- git commit: {git_commit()}
- seed: {args.seed}
- time: {clock}
- workload: Poisson arrivals at {args.rate:g}/s over {span:,.0f} s, at most {args.concurrency} requests open
  at once; prompts lognormal around {SHORT_PROMPT_MEDIAN} tokens (16-4k), {long_share:.0%} of them 4k-8k;
  max_tokens uniform 64-512, replies lognormal around {REPLY_MEDIAN} tokens cut at max_tokens
- route: targets flaky, cheap-slow, fast-expensive in that order; {ATTEMPTS} attempts; no fallback;
  no max_in_flight; `slo` with a {args.slo_ms:g} ms TTFT budget; weights all 1
- flaky's outage: {outage[0]:,.0f} s to {outage[1]:,.0f} s

{pool_table()}

## Results

TTFT: from a request's arrival to its first chunk, retries and backoff included, over the requests
that succeeded. Client errors: requests that failed as the client saw them (before the first byte,
or cut after it). Cost: the usage of the replies the clients received, at the serving backend's price.
Share: which backend served the successful requests.

{main_table(rows)}

{interpretation(rows, runs, args.slo_ms)}

## Details

{detail_table(rows, runs, args.slo_ms)}

Requests that waited for a client slot (all policies): {waited}.
Unexpected exceptions from the fake backends: {sum(run.contract_breaks for run in runs)}.
"""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=2000, help="requests per policy (default 2000)")
    parser.add_argument(
        "--rate",
        type=float,
        default=2.0,
        help="Poisson arrival rate, requests per simulated second (default 2)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=1,
        help="seeds the workload, the backends' luck and the router's rng (default 1)",
    )
    parser.add_argument(
        "--time-scale",
        type=float,
        default=0.0,
        help="real seconds per simulated second; 0 (default): a virtual clock",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=128,
        help="most requests the client keeps open at once (default 128)",
    )
    parser.add_argument(
        "--slo-ms", type=float, default=500.0, help="the slo route's TTFT budget, ms (default 500)"
    )
    parser.add_argument(
        "--policies",
        default=",".join(POLICIES),
        help="comma-separated subset of POLICIES, in order (default: all)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave results.md alone")
    args = parser.parse_args(argv)
    args.policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in args.policies if p not in POLICIES]
    if unknown:
        parser.error(f"unknown policies {unknown}; known: {', '.join(POLICIES)}")
    if args.requests < 1 or args.rate <= 0 or args.concurrency < 1 or args.time_scale < 0:
        parser.error("--requests, --rate and --concurrency must be positive, --time-scale ≥ 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"simulate: {args.requests} requests x {len(args.policies)} policies", file=sys.stderr)
    runs, outage, jobs = run_all(args)
    text = report(args, runs, outage, jobs)
    print(text)
    broken = [r.policy for r in runs if r.contract_breaks]
    if broken:  # a fake backend raised outside backends.errors: the figures are not trustworthy
        print(
            f"simulate: unexpected backend exceptions under {broken}; results.md not written", file=sys.stderr
        )
        return 1
    if not args.no_write:
        RESULTS.write_text(text)
        print(f"simulate: wrote {RESULTS.relative_to(REPO)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
