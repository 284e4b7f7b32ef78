"""What the bench sends: request bodies, grouped in sessions.

A *session* is one user's conversation: ``rounds`` requests sent one after another, each carrying
the history so far (the earlier prompts, and synthetic assistant turns of the planned reply length,
so the workload does not depend on what the target answers). A single-turn request is a session of
one round. Lengths count words from a small vocabulary, which real tokenizers turn into roughly as
many tokens; the figures use the ``usage`` the target reports where it reports one.

- ``shared_prefix``: that share of every prompt is a prefix common to all requests (a system
  prompt, few-shot examples): what prefix caching and session affinity feed on;
- ``repeat``: that share of sessions is an exact repeat of an earlier one (response-cache hits);
- a JSONL trace replays recorded requests: one object a line with ``messages`` or ``prompt``
  (or ``prompt_tokens`` to make one up), optional ``max_tokens``, ``session`` (lines of one
  session stay in order) and ``timestamp`` (seconds from the start, for ``--arrivals trace``).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one "
    "had by word but not what all were we when your can said there use an each which she do how their "
    "if will up other about out many then them these so some her would make like him into time has look "
    "two more write go see number no way could people my than first water been call who oil its now find "
    "long down day did get come made may part over new sound take only little work know place year live "
    "me back give most very after thing our just name good sentence man think say great where help "
    "through much before line right too mean old any same tell boy follow came want show also around "
    "form three small set put end does another well large must big even such because turn here why ask"
).split()

_UNIFORM = re.compile(r"^(\d+)-(\d+)$")
_NORMAL = re.compile(r"^normal:(\d+(?:\.\d+)?),(\d+(?:\.\d+)?)$")


@dataclass(frozen=True, slots=True)
class Length:
    """A length in tokens: fixed (``128``), uniform (``64-256``) or normal (``normal:128,32``)."""

    low: int
    high: int
    sigma: float = 0.0  # > 0: normal around ``low`` (``high`` == ``low``)

    @classmethod
    def parse(cls, text: str) -> Length:
        text = text.strip()
        if text.isdigit() and int(text) > 0:
            return cls(int(text), int(text))
        if m := _UNIFORM.match(text):
            low, high = int(m[1]), int(m[2])
            if 0 < low <= high:
                return cls(low, high)
        if m := _NORMAL.match(text):
            mean = round(float(m[1]))
            if mean > 0:
                return cls(mean, mean, float(m[2]))
        raise ValueError(f"{text!r} is not a length: give 128, 64-256 or normal:128,32 (positive)")

    def draw(self, rng: random.Random) -> int:
        if self.sigma:
            return max(1, round(rng.gauss(self.low, self.sigma)))
        return self.low if self.low == self.high else rng.randint(self.low, self.high)

    @property
    def largest(self) -> int:
        return self.high if not self.sigma else round(self.low + 4 * self.sigma)


@dataclass(slots=True)
class Planned:
    """One request to send: its body (encoded once), its session and round."""

    body: bytes
    session: str
    round: int
    max_tokens: int | None
    at_s: float | None = None  # a trace's timestamp


Session = list[Planned]


@dataclass(slots=True)
class Workload:
    model: str
    endpoint: str = "chat"  # chat | completions
    prompt_len: Length = field(default_factory=lambda: Length(128, 128))
    reply_len: Length = field(default_factory=lambda: Length(64, 64))
    shared_prefix: float = 0.0
    rounds: int = 1
    repeat: float = 0.0
    stream: bool = True
    temperature: float = 0.0
    ignore_eos: bool = False
    trace: Path | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.endpoint not in ("chat", "completions"):
            raise ValueError(f"endpoint must be chat or completions, not {self.endpoint!r}")
        if not 0 <= self.shared_prefix < 1:
            raise ValueError("the shared prefix is a share of the prompt: 0 <= share < 1")
        if not 0 <= self.repeat < 1:
            raise ValueError("the repeat ratio is a share of sessions: 0 <= ratio < 1")
        if self.rounds < 1:
            raise ValueError("rounds must be at least 1")

    @property
    def path(self) -> str:
        return "/chat/completions" if self.endpoint == "chat" else "/completions"

    def sessions(self, worker: int = 0) -> Iterator[Session]:
        """Sessions without end (a trace is replayed in a cycle); ``worker`` seeds each process
        differently so workers do not send the same prompts."""
        rng = random.Random(self.seed * 1_000_003 + worker)
        if self.trace is not None:
            recorded = load_trace(self.trace, self, rng)
            if not recorded:
                raise ValueError(f"{self.trace}: the trace holds no requests")
            while True:
                yield from recorded
        prefix_rng = random.Random(self.seed)  # one prefix for every worker
        prefix = [prefix_rng.choice(_WORDS) for _ in range(self.prompt_len.largest)]
        earlier: list[Session] = []
        n = 0
        while True:
            if earlier and rng.random() < self.repeat:
                yield rng.choice(earlier)
                continue
            n += 1
            session = self._session(f"w{worker}-s{n}", rng, prefix)
            if self.repeat and len(earlier) < 1000:
                earlier.append(session)
            yield session

    def _session(self, name: str, rng: random.Random, prefix: list[str]) -> Session:
        history: list[dict[str, str]] = []
        out: Session = []
        for r in range(self.rounds):
            length = self.prompt_len.draw(rng)
            shared = min(length, round(length * self.shared_prefix)) if r == 0 else 0
            words = prefix[:shared] + [rng.choice(_WORDS) for _ in range(length - shared)]
            reply = self.reply_len.draw(rng)
            history.append({"role": "user", "content": " ".join(words)})
            out.append(self.planned(list(history), reply, name, r))
            history.append({"role": "assistant", "content": " ".join(rng.choices(_WORDS, k=reply))})
        return out

    def planned(
        self,
        messages: list[dict[str, Any]] | str,
        max_tokens: int | None,
        session: str,
        round_: int,
        at_s: float | None = None,
    ) -> Planned:
        body: dict[str, Any] = {"model": self.model, "temperature": self.temperature}
        if self.endpoint == "chat":
            body["messages"] = (
                [{"role": "user", "content": messages}] if isinstance(messages, str) else messages
            )
        else:
            body["prompt"] = (
                messages if isinstance(messages, str) else "\n".join(str(m["content"]) for m in messages)
            )
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if self.ignore_eos:
            body["ignore_eos"] = True  # vLLM's extension: generate max_tokens whatever the text
        if self.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return Planned(orjson.dumps(body), session, round_, max_tokens, at_s)


def load_trace(path: Path, workload: Workload, rng: random.Random) -> list[Session]:
    """A JSONL trace's requests as sessions, in the order of their first line."""
    sessions: dict[str, Session] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON: {exc}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number}: each line must be a JSON object")
        if isinstance(row.get("messages"), list):
            content: list[dict[str, Any]] | str = row["messages"]
        elif isinstance(row.get("prompt"), str):
            content = row["prompt"]
        elif isinstance(row.get("prompt_tokens"), int) and row["prompt_tokens"] > 0:
            content = " ".join(rng.choices(_WORDS, k=row["prompt_tokens"]))
        else:
            raise ValueError(f"{path}:{number}: give messages, prompt or prompt_tokens")
        max_tokens = row.get("max_tokens", row.get("output_tokens"))
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise ValueError(f"{path}:{number}: max_tokens must be a positive integer")
        at = row.get("timestamp")
        if at is not None and not isinstance(at, int | float):
            raise ValueError(f"{path}:{number}: timestamp must be a number of seconds")
        name = str(row.get("session", f"line{number}"))
        session = sessions.setdefault(name, [])
        session.append(workload.planned(content, max_tokens, name, len(session), at))
    return list(sessions.values())
