"""Which llama.cpp sequence a new prompt gets, and how much of it is already in the KV cache.

The engine's context has ``parallel`` sequence ids. A free one keeps the KV cells of the
request that last used it (its prompt and the reply tokens that were decoded), so a new
prompt that starts the same way (a chat's system prompt, the earlier turns of a
conversation) skips that prefix. ``SeqTable`` remembers what each free sequence holds and
picks, for a prompt:

* the free sequence whose cells share the longest prefix with it (ties and no match: the
  least recently released one, so a cached conversation survives as long as possible);
* with one KV stream per sequence (a CPU context), a sequence next to running ones, since
  llama.cpp cuts a batch into a micro-batch per run of consecutive seq ids, each a full
  pass over the weights (``RUN_COST_TOKENS``);
* a donor: another sequence, free or running, that holds a longer prefix of the prompt by at
  least ``COPY_MIN_GAIN`` tokens, whose cells the engine copies instead of prefilling them.

Pure bookkeeping: the engine does the llama.cpp memory calls the plan asks for.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

#: With one KV stream per sequence, each run of consecutive seq ids in a batch is its own
#: micro-batch: a pass over all the weights, which costs about as much as prefilling this many
#: prompt tokens (SmolLM2 on 2 CPU cores: 6 seqs as one run 26 ms a step, as three 45 ms).
RUN_COST_TOKENS = 4

#: Copying another sequence's prefix pays off from this many more tokens than the seq's own.
#: Across KV streams llama.cpp copies a whole stream (SmolLM2 with 512 cells a stream: 12 MB,
#: about one token's prefill on 2 CPU cores); within one stream a copy is free.
COPY_MIN_GAIN = 8


@dataclass(frozen=True, slots=True)
class SeqPlan:
    """Where a prompt goes: ``seq``, whose ``cells`` cells begin with the prompt's first ``own``
    tokens; or, when ``donor`` >= 0, the donor's first ``donor_len`` cells copied into ``seq``."""

    seq: int
    own: int
    cells: int
    donor: int = -1
    donor_len: int = 0


class SeqTable:
    """The free sequence ids and the tokens each one's KV cells hold."""

    def __init__(self, parallel: int, *, unified_kv: bool) -> None:
        self.parallel = parallel
        self._unified = unified_kv
        self._free = list(range(parallel - 1, -1, -1))
        #: per seq id: the tokens at positions 0.. of its KV cells (kept while it is free)
        self._resident: list[list[int]] = [[] for _ in range(parallel)]
        self._released = [0] * parallel  # release order, for the least-recently-used choice
        self._clock = 0

    @property
    def has_free(self) -> bool:
        return bool(self._free)

    def resident(self, seq: int) -> list[int]:
        return self._resident[seq]

    def take(self, tokens: list[int], running: Collection[int], held: Callable[[int], list[int]]) -> SeqPlan:
        """Take a free seq for a prompt (at least one is free). ``running``: the seq ids decoding
        now; ``held(seq)``: the tokens in any seq's cells, a running one's included."""
        limit = len(tokens) - 1  # one prompt token is always decoded, for its logits
        best, best_key, own = self._free[0], (-1 << 30, 0), 0
        for seq in self._free:
            shared = common_prefix(self._resident[seq], tokens, limit)
            score = shared
            if not self._unified:  # a seq next to running ones adds no micro-batch to each step
                score -= RUN_COST_TOKENS * (1 - ((seq - 1) in running) - ((seq + 1) in running))
            key = (score, -self._released[seq])
            if key > best_key:
                best, best_key, own = seq, key, shared
        self._free.remove(best)
        cells = len(self._resident[best])
        self._resident[best] = []  # filled in again when the seq is released
        donor, donor_len = -1, own + COPY_MIN_GAIN - 1
        for other in range(self.parallel):
            if other != best:
                shared = common_prefix(held(other), tokens, limit)
                if shared > donor_len:
                    donor, donor_len = other, shared
        if donor < 0:
            return SeqPlan(best, own, cells)
        return SeqPlan(best, own, cells, donor, donor_len)

    def release(self, seq: int, kept: list[int]) -> None:
        """``seq`` is free again, its cells holding ``kept`` (positions 0..)."""
        self._resident[seq] = kept
        self._clock += 1
        self._released[seq] = self._clock
        self._free.append(seq)


def common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    p = 0
    while p < n and a[p] == b[p]:
        p += 1
    return p


__all__ = ["SeqPlan", "SeqTable", "common_prefix"]
