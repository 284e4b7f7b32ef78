"""A hot shared prefix on a two-server vLLM pool: later turns must not pay for affinity.

A few long system prompts with Zipf popularity (the hottest opens most conversations), several
turns per conversation, streamed replies, against two simulated vLLM servers whose engines model
time (``tests.vllm_engine``: prefill per uncached character, decode steps slowing with each
running sequence, a prefix cache). The rules run side by side in one test, each on the same
workload with fresh prompts: ``auto`` as it was (prefix first, unless the holder is
``load_guard`` = 4,096 tokens busier, each stream counted as its ``max_tokens``), which sends
every conversation of the hot prompt to the server that holds it; ``least_in_flight``; and
``auto`` with the cost model. TTFTs are read on the simulators' own clock (the TTFT the engine
computed), not the wall clock, so a loaded machine's late wake-ups do not decide the verdict;
the verdicts are ratios with margins.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import ExitStack, asynccontextmanager

import pytest

from backends.base import BackendRequest, Resources
from backends.http import HttpClient
from backends.vllm import VllmBackend, VllmConfig
from backends.vllm import backend as pool_module
from backends.vllm.affinity import Ask, Candidate, Decision, Routing
from tests.vllm_sim import VllmSim

CONVERSATIONS = 48
TURNS = 3
#: concurrent users: a few fewer than the pool's 2 x 16 sequences, so that a balanced pool never
#: queues and a lopsided one does (a server at max_num_seqs admits a request only when a running
#: one ends, about a whole reply's decode later)
USERS = 28
#: conversations per system prompt (6 prompts): Zipf-like, the hottest opens 60% of them
SHARES = (29, 8, 5, 3, 2, 1)
#: each rule runs this many times, interleaved; the percentiles pool the runs
ROUNDS = 3
WORDS = "river stone light bridge garden window market winter summer morning evening letter".split()


def legacy_decide(
    routing: Routing,
    candidates: Sequence[Candidate],
    ask: Ask,
    *,
    block_tokens: float,
    rng: random.Random,
    turn: int = 0,
    load_guard: float | None = None,
) -> Decision:
    """``auto`` before the cost model, as it was: the endpoints holding the longest cached prefix
    take the request unless they are more than 4,096 queued tokens busier than the least busy;
    then the lowest ``uncached + queued`` tokens wins."""
    ordered = sorted(candidates, key=lambda c: c.name)
    pool = ordered
    longest = max(c.cached_blocks for c in ordered)
    if longest > 0:
        least = min(c.queued_tokens for c in ordered)
        holders = [c for c in ordered if c.cached_blocks == longest and c.queued_tokens - least <= 4096]
        pool = holders or ordered

    def score(c: Candidate) -> float:
        return max(0.0, ask.prompt_tokens - c.cached_blocks * block_tokens) + c.queued_tokens

    best = min(score(c) for c in pool)
    near = [c for c in pool if score(c) <= best + block_tokens]
    return Decision(near[0] if len(near) == 1 else rng.choice(near), {})


def system_prompt(tag: str, k: int) -> str:
    rng = random.Random(f"system/{k}")
    return f"[{tag}] You are assistant {k}. Notes: " + " ".join(rng.choice(WORDS) for _ in range(900))


def user_message(c: int, turn: int) -> str:
    rng = random.Random(f"user/{c}/{turn}")
    return f"Question {turn + 1}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 40))) + "?"


async def workload(backend: VllmBackend, tag: str) -> None:
    """Conversations whose turns run in order; ``USERS`` workers take any conversation's next turn."""
    opening = [k for k, share in enumerate(SHARES) for _ in range(share)]
    random.Random(7).shuffle(opening)
    history = {
        c: [{"role": "system", "content": system_prompt(tag, opening[c])}] for c in range(CONVERSATIONS)
    }
    turn = dict.fromkeys(range(CONVERSATIONS), 0)
    ready: asyncio.Queue[int | None] = asyncio.Queue()
    for c in range(CONVERSATIONS):
        ready.put_nowait(c)
    left = CONVERSATIONS

    async def worker() -> None:
        nonlocal left
        while (c := await ready.get()) is not None:
            history[c].append({"role": "user", "content": user_message(c, turn[c])})
            body = {"model": "chat", "messages": list(history[c]), "max_tokens": 32, "stream": True}
            chunks = await backend.stream(BackendRequest("chat", body, f"{tag}-{c}-{turn[c]}", stream=True))
            text = b"".join([chunk async for chunk in chunks])
            assert text.endswith(b"data: [DONE]\n\n")
            history[c].append({"role": "assistant", "content": "The most obvious color is red"})
            turn[c] += 1
            if turn[c] < TURNS:
                ready.put_nowait(c)
            else:
                left -= 1
                if left == 0:
                    for _ in range(USERS):
                        ready.put_nowait(None)

    await asyncio.gather(*(worker() for _ in range(USERS)))


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


@pytest.fixture
def sims() -> Iterator[list[VllmSim]]:
    knobs = {
        "max_model_len": 16384,
        "max_num_seqs": 16,
        "kv_capacity_tokens": 1_000_000,
        "cache_blocks": 100_000,
        "decode_s_per_token": 0.004,
        "slowdown_per_running": 0.05,
        "prefill_s_per_char": 0.00001,
        "step_budget_chars": 8192,
    }
    with ExitStack() as stack:
        yield [stack.enter_context(VllmSim(**knobs)) for _ in range(2)]


@pytest.fixture
async def http() -> AsyncIterator[HttpClient]:
    client = HttpClient()
    await client.start()
    yield client
    await client.close()


@asynccontextmanager
async def pool(http: HttpClient, sims: list[VllmSim], routing: str) -> AsyncIterator[VllmBackend]:
    config = VllmConfig.model_validate(
        {
            "kind": "vllm",
            "model": "smollm2",
            "endpoints": [s.base_url for s in sims],
            "routing": routing,
            "scrape_interval_s": 0.1,
            "health_interval_s": 1.0,
            "timeouts": {"connect": 2.0, "first_token": 30.0, "total": 60.0},
        }
    )
    backend = VllmBackend("pool", config, Resources(http=http), rng=random.Random(3))
    await backend.start()
    try:
        yield backend
    finally:
        await backend.close()


async def test_later_turns_of_a_hot_prefix_do_not_pay_for_affinity(
    http: HttpClient, sims: list[VllmSim], monkeypatch: pytest.MonkeyPatch
) -> None:
    rules = ("legacy", "least_in_flight", "auto")
    later: dict[str, list[float]] = {r: [] for r in rules}
    first: dict[str, list[float]] = {r: [] for r in rules}
    splits: dict[str, list[int]] = {r: [] for r in rules}
    hits: dict[str, list[float]] = {r: [] for r in rules}
    for round_ in range(ROUNDS):
        for i, rule in enumerate(rules[round_ % 3 :] + rules[: round_ % 3]):
            for sim in sims:
                sim.reset()
            with monkeypatch.context() as patch:
                if rule == "legacy":
                    patch.setattr(pool_module, "decide", legacy_decide)
                async with pool(http, sims, "auto" if rule == "legacy" else rule) as backend:
                    await workload(backend, f"r{round_}{i}")
            for sim in sims:
                for record in sim.requests:
                    turns = sum(m["role"] == "user" for m in record["body"]["messages"])
                    (later if turns > 1 else first)[rule].append(record["ttft_s"])
            splits[rule].append(max(s.served for s in sims))
            hits[rule].append(sum(s.prefix_hits for s in sims) / sum(s.prefix_queries for s in sims))
    summary = {
        r: f"later p99 {1000 * p99(later[r]):.1f} ms, all p99 {1000 * p99(later[r] + first[r]):.1f} ms, "
        f"busier server {splits[r]}, hit {sum(hits[r]) / len(hits[r]):.3f}"
        for r in rules
    }
    print(summary)
    every = {r: later[r] + first[r] for r in rules}
    # the old rule sends the hot prompt's conversations to one server, which fills up: its later
    # turns wait for slots (measured 2.6-2.9x least_in_flight's on a loaded 2-core machine)
    assert p99(later["legacy"]) > 2 * p99(later["least_in_flight"]), summary
    # the cost model keeps later turns about as quick as spreading does (measured 0.4-1.3x; the
    # p99 of ~290 samples is their third largest, hence the margin, still well under the old
    # rule's 2x), and the whole run's p99 (the cold opening burst) no worse than either
    assert p99(later["auto"]) < 1.6 * p99(later["least_in_flight"]), summary
    assert p99(every["auto"]) < 1.2 * min(p99(every["legacy"]), p99(every["least_in_flight"])), summary
    # and it still uses the cache more than spreading does
    assert sum(hits["auto"]) > sum(hits["least_in_flight"]), summary
