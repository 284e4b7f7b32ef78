"""Token sampling for the llama.cpp engine: numpy over the logits of a whole step.

Why not llama.cpp's sampler chains: every chain call is a ctypes foreign call, which gives up
the GIL and must win it back from the event loop (up to a switch interval each); a step with
128 sequences made 128 of them, and on an H200 that was most of each step (128 greedy
streams: 2,965 tok/s with a chain call per sequence, 7,839 with this module; sampled ones
749 and 3,021: benchmarks/gpu/results/llamacpp_gpu_h200.txt). And its
``top_p`` sorts the whole vocabulary: 2.6 ms a call for SmolLM2's 49k tokens on this CPU,
more than a decode step's share per sequence. Here greedy rows are one ``argmax`` over all
of them, and the sampled rows share one temperature scaling and ``exp``; then top-p ranks only
the tokens within a factor 1,000 of the most likely one (a few dozen, usually), and the whole
vocabulary only when those hold less than ``top_p`` of the probability.

Semantics, as vLLM and OpenAI apply them: frequency/presence penalties on the counts of the
tokens generated so far, then temperature, then top-p (the smallest set of most likely tokens
whose probability reaches ``top_p``), then a draw from that set. Temperature 0 is greedy: the
first token with the highest logit, as llama.cpp's greedy sampler picks it, so greedy replies
equal a direct ``llama_cpp.Llama`` call's; so is any temperature below ``GREEDY_BELOW``. A ``seed``
makes a reply reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: top-p ranks the tokens whose probability is at least this fraction of the most likely
#: token's, one floor after the other, and sorts the whole vocabulary only when the tokens above
#: the last floor hold less than top_p. Exact: every token left out is less likely than every
#: token ranked, so the nucleus is a prefix of the ranked ones whenever they reach top_p.
_NUCLEUS_FLOORS = (1e-3, 1e-7)

#: temperatures below this sample as greedy: a logit gap of 1e-3 already weighs e^100 there, so
#: the draw is the argmax anyway, and 1/T of a tinier one overflows float32 (1e-300 made inf
#: weights, then NaN, and killed the engine thread)
GREEDY_BELOW = 1e-5


@dataclass(slots=True)
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    #: None: until the sequence's share of the context is used up
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0


class TokenSampler:
    """One request's sampling state: its settings, random generator and token counts."""

    __slots__ = ("counts", "greedy", "penalised", "rng", "settings")

    def __init__(self, settings: Sampling) -> None:
        self.settings = settings
        self.penalised = bool(settings.frequency_penalty or settings.presence_penalty)
        #: plain argmax, batched with the other greedy rows of a step
        self.greedy = settings.temperature < GREEDY_BELOW and not self.penalised
        self.rng = np.random.default_rng(None if settings.seed is None else settings.seed & 0xFFFFFFFF)
        self.counts: dict[int, int] = {}

    def accept(self, token: int) -> None:
        if self.penalised:
            self.counts[token] = self.counts.get(token, 0) + 1

    def pick(self, logits: np.ndarray) -> int:
        """A token from one row of logits (float32, the vocabulary long; read only)."""
        s = self.settings
        x = logits
        if self.penalised and self.counts:
            x = logits.copy()
            ids = np.fromiter(self.counts, dtype=np.intp, count=len(self.counts))
            n = np.fromiter(self.counts.values(), dtype=np.float32, count=len(self.counts))
            x[ids] -= n * s.frequency_penalty + s.presence_penalty
        if s.temperature < GREEDY_BELOW:
            return int(x.argmax())
        x = x * np.float32(1.0 / s.temperature)
        x -= x.max()
        return self.draw(np.exp(x, out=x))

    def draw(self, weights: np.ndarray) -> int:
        """A token drawn from unnormalised probabilities whose largest is 1 (top-p applied)."""
        top_p = self.settings.top_p
        total = float(weights.sum(dtype=np.float64))
        likely = np.flatnonzero(weights >= _NUCLEUS_FLOORS[0])
        if not (likely.size and math.isfinite(total)):  # NaN logits: never an IndexError here
            return int(weights.argmax())
        if top_p >= 1.0:
            # the likely tokens, in any order, hold nearly all of the mass: the rest of the
            # vocabulary is summed up only when the draw lands past them
            cumulative = np.cumsum(weights[likely], dtype=np.float64)
            u = self.rng.random() * total
            if u < cumulative[-1]:
                return _pick(cumulative, u, likely)
            rest = np.flatnonzero(weights < _NUCLEUS_FLOORS[0])
            return _pick(np.cumsum(weights[rest], dtype=np.float64), u - float(cumulative[-1]), rest)
        target = top_p * total
        for floor in _NUCLEUS_FLOORS:
            top = likely if floor == _NUCLEUS_FLOORS[0] else np.flatnonzero(weights >= floor)
            top = top[np.argsort(-weights[top], kind="stable")]
            cumulative = np.cumsum(weights[top], dtype=np.float64)
            if cumulative[-1] >= target:
                break
        else:  # a flat distribution: rank all of it
            top = np.argsort(-weights, kind="stable")
            cumulative = np.cumsum(weights[top], dtype=np.float64)
        keep = min(int(np.searchsorted(cumulative, target)) + 1, len(cumulative))
        return _pick(cumulative[:keep], self.rng.random() * float(cumulative[keep - 1]), top)


def _pick(cumulative: np.ndarray, u: float, tokens: np.ndarray) -> int:
    """The token whose slice of ``cumulative`` holds ``u`` (the last one past the end: rounding)."""
    i = min(int(np.searchsorted(cumulative, u, side="right")), len(cumulative) - 1)
    return int(tokens[i])


def sample_rows(logits: np.ndarray, samplers: Sequence[TokenSampler]) -> list[int]:
    """One token per row of ``logits`` (n_rows x n_vocab, read only), row ``i`` by ``samplers[i]``."""
    if all(s.greedy for s in samplers):
        tokens = logits.argmax(axis=1).tolist()
    else:
        tokens = [0] * len(samplers)
        greedy = [i for i, s in enumerate(samplers) if s.greedy]
        if greedy:
            for i, token in zip(greedy, logits[greedy].argmax(axis=1).tolist(), strict=True):
                tokens[i] = token
        plain = [i for i, s in enumerate(samplers) if not (s.greedy or s.penalised)]
        if plain:  # one scaling and one exp for all of them; logits[plain] is a copy
            weights = logits[plain]
            weights *= np.array([1.0 / samplers[i].settings.temperature for i in plain], dtype=np.float32)[
                :, None
            ]
            weights -= weights.max(axis=1, keepdims=True)
            np.exp(weights, out=weights)
            for row, i in enumerate(plain):
                tokens[i] = samplers[i].draw(weights[row])
        for i, s in enumerate(samplers):
            if s.penalised:
                tokens[i] = s.pick(logits[i])
    for s, token in zip(samplers, tokens, strict=True):
        s.accept(token)
    return tokens


__all__ = ["GREEDY_BELOW", "Sampling", "TokenSampler", "sample_rows"]
