"""Token sampling for the llama.cpp engine: numpy over the logits of a whole step.

Why not llama.cpp's sampler chains: every chain call is a ctypes foreign call, which gives up
the GIL and must win it back from the event loop (up to a switch interval each); a step with
128 sequences made 128 of them, and the engine spent most of a GPU step waiting. And its
``top_p`` sorts the whole vocabulary: 2.6 ms a call for SmolLM2's 49k tokens on this CPU,
more than a decode step's share per sequence. Here greedy rows are one ``argmax`` over all
of them, and a sampled row costs ~0.15 ms (top-p looks at the 64 most likely tokens first and
sorts everything only when they hold less than ``top_p`` of the probability).

Semantics, as vLLM and OpenAI apply them: frequency/presence penalties on the counts of the
tokens generated so far, then temperature, then top-p (the smallest set of most likely tokens
whose probability reaches ``top_p``), then a draw from that set. Temperature 0 is greedy: the
first token with the highest logit, as llama.cpp's greedy sampler picks it, so greedy replies
equal a direct ``llama_cpp.Llama`` call's. A ``seed`` makes a reply reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: top-p first looks at this many of the most likely tokens (argpartition, not a full sort)
_TOP_P_CANDIDATES = 64


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
        self.greedy = settings.temperature <= 0 and not self.penalised
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
        if s.temperature <= 0:
            return int(x.argmax())
        x = x * np.float32(1.0 / s.temperature)
        x -= x.max()
        weights = np.exp(x, out=x)  # unnormalised probabilities
        if s.top_p >= 1.0:
            cumulative = np.cumsum(weights)
            return _draw(cumulative, self.rng, range(len(cumulative)))
        total = float(weights.sum())
        k = min(_TOP_P_CANDIDATES, len(weights))
        top = np.argpartition(weights, len(weights) - k)[len(weights) - k:]
        top = top[np.argsort(-weights[top], kind="stable")]
        cumulative = np.cumsum(weights[top])
        if cumulative[-1] < s.top_p * total:  # a flat distribution: sort all of it
            top = np.argsort(-weights, kind="stable")
            cumulative = np.cumsum(weights[top])
        keep = int(np.searchsorted(cumulative, s.top_p * total)) + 1
        return _draw(cumulative[:keep], self.rng, top)


def _draw(cumulative: np.ndarray, rng: np.random.Generator, tokens: Sequence[int] | np.ndarray) -> int:
    u = rng.random() * float(cumulative[-1])
    i = min(int(np.searchsorted(cumulative, u, side="right")), len(cumulative) - 1)
    return int(tokens[i])


def sample_rows(logits: np.ndarray, samplers: Sequence[TokenSampler]) -> list[int]:
    """One token per row of ``logits`` (n_rows x n_vocab), row ``i`` by ``samplers[i]``."""
    if all(s.greedy for s in samplers):
        tokens = logits.argmax(axis=1).tolist()
    else:
        tokens = [0] * len(samplers)
        greedy = [i for i, s in enumerate(samplers) if s.greedy]
        if greedy:
            for i, token in zip(greedy, logits[greedy].argmax(axis=1).tolist(), strict=True):
                tokens[i] = token
        for i, s in enumerate(samplers):
            if not s.greedy:
                tokens[i] = s.pick(logits[i])
    for s, token in zip(samplers, tokens, strict=True):
        s.accept(token)
    return tokens


__all__ = ["Sampling", "TokenSampler", "sample_rows"]
