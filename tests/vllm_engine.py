"""The simulated vLLM server's scheduler (``tests.vllm_sim``): one engine step at a time.

As vLLM's v1 scheduler does, each step decodes one token for every running sequence whose
prefill is done and spends the rest of a token budget (``step_budget_chars``) on prefills,
first come first served (chunked prefill); a sequence's first token comes out of the step that
finishes its prefill. Waiting requests are admitted while fewer than ``max_num_seqs`` run and
their prompt and reply fit the KV capacity; the prefix cache is looked up at admission and the
prompt's blocks are cached once its prefill is done. A step lasts::

    decode_s_per_token * (1 + slowdown_per_running * (sequences in the step - 1))
    + prefill_s_per_char * prefill characters in the step

The engine keeps its own simulated clock, the sum of the steps' modelled durations, and
records each sequence's TTFT on it (``Seq.ttft_s``): on a loaded machine the real sleeps
overshoot, but the simulated TTFT still counts exactly the steps a request waited through.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


class Knobs(Protocol):
    """The server settings the engine reads at every step (a test may turn them while it runs)."""

    max_num_seqs: int
    kv_capacity_tokens: int
    step_budget_chars: int
    prefill_s_per_char: float
    decode_s_per_token: float
    slowdown_per_running: float


@dataclass(eq=False)
class Seq:
    """One request inside the engine."""

    prompt: str
    prompt_tokens: int
    #: tokens to generate
    tokens: int
    arrived: float = 0.0
    cached_chars: int = 0
    prefill_left: int = 0
    generated: int = 0
    #: simulated seconds from arrival to the first token
    ttft_s: float | None = None
    aborted: bool = False
    #: one item per generated token (its index), then None
    out: asyncio.Queue[int | None] = field(default_factory=asyncio.Queue)

    @property
    def kv_tokens(self) -> int:
        return self.prompt_tokens + self.tokens


class Engine:
    def __init__(self, knobs: Knobs, lookup: Callable[[Seq], int], cache: Callable[[str], None]) -> None:
        """``lookup(seq)``: characters of its prompt cached (counted as a prefix-cache query);
        ``cache(prompt)``: its blocks are cached now."""
        self._knobs, self._lookup, self._cache = knobs, lookup, cache
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self.kv_tokens = 0
        #: simulated seconds: the sum of every step's modelled duration
        self.now = 0.0
        self._step: tuple[float, float, float] | None = None  # wall start, wall length, simulated length
        self._wake = asyncio.Event()

    def clock(self) -> float:
        """Simulated time now; within a step, the share of it that has passed."""
        if self._step is None:
            return self.now
        started, wall, length = self._step
        done = (asyncio.get_running_loop().time() - started) / wall if wall > 0 else 1.0
        return self.now + min(1.0, max(0.0, done)) * length

    def submit(self, seq: Seq) -> None:
        seq.arrived = self.clock()
        self.waiting.append(seq)
        self._wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._drop_aborted()
            self._admit()
            if not self.running:
                self._wake.clear()
                await self._wake.wait()
                continue
            k = self._knobs
            budget = k.step_budget_chars
            decodes = [s for s in self.running if s.prefill_left == 0]
            chunks: list[tuple[Seq, int]] = []
            for s in self.running:
                if s.prefill_left > 0 and budget > 0:
                    take = min(budget, s.prefill_left)
                    budget -= take
                    chunks.append((s, take))
            batch = len(decodes) + len(chunks)
            length = k.decode_s_per_token * (
                1 + k.slowdown_per_running * (batch - 1)
            ) + k.prefill_s_per_char * sum(take for _, take in chunks)
            self._step = (loop.time(), length, length)
            await asyncio.sleep(length)
            self._step = None
            self.now += length
            for s in decodes:
                self._emit(s)
            for s, take in chunks:
                s.prefill_left -= take
                if s.prefill_left == 0:
                    self._cache(s.prompt)
                    s.ttft_s = self.now - s.arrived
                    self._emit(s)

    def _emit(self, s: Seq) -> None:
        if s.aborted:
            return
        if s.generated < s.tokens:
            s.out.put_nowait(s.generated)
            s.generated += 1
        if s.generated >= s.tokens:
            s.out.put_nowait(None)
            self._finish(s)

    def _finish(self, s: Seq) -> None:
        if s in self.running:
            self.running.remove(s)
            self.kv_tokens -= s.kv_tokens

    def _drop_aborted(self) -> None:
        for s in [s for s in self.running if s.aborted]:
            self._finish(s)
        if any(s.aborted for s in self.waiting):
            self.waiting = deque(s for s in self.waiting if not s.aborted)

    def _admit(self) -> None:
        k = self._knobs
        while self.waiting and len(self.running) < k.max_num_seqs:
            s = self.waiting[0]
            if self.running and self.kv_tokens + s.kv_tokens > k.kv_capacity_tokens:
                break  # wait for running ones to end and free their blocks
            self.waiting.popleft()
            s.cached_chars = self._lookup(s)
            # vLLM computes at least the prompt's last token, even when all of it is cached
            s.prefill_left = max(1, len(s.prompt) - s.cached_chars)
            self.running.append(s)
            self.kv_tokens += s.kv_tokens


__all__ = ["Engine", "Knobs", "Seq"]
