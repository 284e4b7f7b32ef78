"""One request inside the llama.cpp engine (``backends.llamacpp.engine``), and what it answers.

A ``Job`` is created on the event loop by ``Engine.submit`` and from then on touched by the
engine thread only. Its queue receives ``str`` text deltas, then one ``Finished`` or ``Failed``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from backends.llamacpp.sampling import Sampling, TokenSampler
from backends.llamacpp.text import ReplyText


@dataclass(slots=True)
class Finished:
    reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass(slots=True)
class Failed:
    message: str


class Job:
    """One request's life inside the engine; fields are touched by the engine thread only."""

    __slots__ = (
        "admitted",
        "generated",
        "loop",
        "max_new",
        "n_fed",
        "n_gen",
        "next_token",
        "pos",
        "queue",
        "reused",
        "sampler",
        "sampling",
        "seq",
        "text",
        "tokens",
    )

    def __init__(
        self,
        tokens: list[int],
        sampling: Sampling,
        queue: asyncio.Queue[Any],
        loop: asyncio.AbstractEventLoop,
        max_new: int,
    ) -> None:
        self.tokens = tokens
        self.sampling = sampling
        self.queue = queue
        self.loop = loop
        self.max_new = max_new
        self.seq = -1
        self.admitted = 0  # the engine's admission count when it got a seq
        self.n_fed = 0  # prompt tokens already in the KV cache
        self.pos = 0
        self.next_token = -1
        self.n_gen = 0
        #: every sampled token; all but the last one sampled are in the KV cache
        self.generated: list[int] = []
        self.reused = 0  # prompt tokens found in the KV cache at admission
        self.sampler = TokenSampler(sampling)
        self.text = ReplyText(sampling.stop)
