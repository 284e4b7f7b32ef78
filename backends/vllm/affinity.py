"""Where a prompt's prefix is probably cached, and which endpoint of a vLLM pool gets a request.

vLLM keeps the KV cache of recent prompts and skips the prefill of any prefix it still
holds (automatic prefix caching), so the endpoint that served a conversation's last turn
or a long shared system prompt answers the next request sharing it much sooner. The
gateway cannot see that cache; it remembers what it sent where instead.

A prompt is rendered in full (every message with its role, not the first one only; for
completions the prompt itself) and cut into blocks of ``block_chars`` characters. Block
``i``'s key hashes block ``i`` together with block ``i-1``'s key, so a key stands for the
whole prefix up to it, as vLLM's own block hashes do; only full blocks count. Each
endpoint's ``PrefixIndex`` holds the keys of the prompts it was sent, expiring after a TTL
(vLLM evicts as its cache fills) and bounded in size (least recently used out first).

``choose`` is the routing rule itself, a pure function of per-endpoint snapshots
(``Candidate``: cached prefix, load, fitted cost model) and the request (``Ask``); ``decide``
also returns the estimates behind it. ``backends.vllm`` documents the rule.
"""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from backends.vllm.cost import DEFAULTS, Coefficients, EndpointLoad, Estimate, expected_ttft

#: a rough characters-per-token for English text and code; the pool scores in tokens
CHARS_PER_TOKEN = 4
Routing = Literal["auto", "round_robin", "least_in_flight", "conversation_hash"]

#: template tokens a chat message adds around its content (role markers, separators)
MESSAGE_OVERHEAD_TOKENS = 4


def render_prompt(endpoint: str, body: dict[str, Any]) -> str:
    """The text whose prefix the server may have cached: what its template turns into tokens, roughly."""
    if endpoint == "chat":
        parts = []
        for message in body.get("messages") or ():
            if not isinstance(message, dict):
                continue
            parts.append(f"<|{message.get('role')}|>\n{_text(message.get('content'))}")
            for key in ("name", "tool_calls", "tool_call_id"):
                if message.get(key) is not None:
                    parts.append(f"[{key}]{_text(message[key])}")
        # tools are rendered into the system prompt by most templates, ahead of every message
        tools = body.get("tools")
        return (f"<|tools|>{_text(tools)}\n" if tools else "") + "\n".join(parts)
    if endpoint == "completions":
        return _text(body.get("prompt"))
    return _text(body.get("input"))


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        # content parts: text as text, anything else (images, audio) by its JSON
        return "".join(
            p["text"]
            if p.get("type") == "text" and isinstance(p.get("text"), str)
            else orjson.dumps(p, option=orjson.OPT_SORT_KEYS).decode()
            for p in value
        )
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def prompt_tokens(endpoint: str, body: dict[str, Any], rendered: str) -> int:
    """An estimate of the prompt's length in tokens (no tokenizer: characters / 4 plus template)."""
    tokens = len(rendered) // CHARS_PER_TOKEN
    if endpoint == "chat":
        tokens += MESSAGE_OVERHEAD_TOKENS * len(body.get("messages") or ())
    return max(1, tokens)


def block_keys(text: str, block_chars: int) -> list[int]:
    """Chained keys of the text's full blocks: key ``i`` stands for ``text[:(i + 1) * block_chars]``.

    Python's own string hash (SipHash, salted per process) is enough: the index lives in one
    process, and it is three times faster than hashlib on the hot path (~45 us for 20k characters).
    """
    keys = []
    previous = 0
    for start in range(0, len(text) - block_chars + 1, block_chars):
        previous = hash((previous, text[start : start + block_chars]))
        keys.append(previous)
    return keys


def stable_hash(*parts: str) -> int:
    """A hash that every gateway replica computes alike (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest(), "big")


def rendezvous(key: str, names: Sequence[str]) -> int:
    """Index of the name that ``key`` maps to (highest random weight): stable across replicas,
    and when a name leaves or joins only the keys that mapped to it move."""
    return max(range(len(names)), key=lambda i: stable_hash(key, names[i]))


class PrefixIndex:
    """The prompt blocks one endpoint was sent recently: key -> expiry time, in LRU order."""

    def __init__(self, ttl_s: float, max_blocks: int) -> None:
        self.ttl_s = ttl_s
        self.max_blocks = max_blocks
        self._expiry: OrderedDict[int, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._expiry)

    def match(self, keys: Sequence[int], now: float) -> int:
        """How many leading blocks of a prompt this endpoint probably holds.

        The chain makes any present key imply its whole prefix, so this is a binary search
        for the last present key rather than a walk (a 100-block prompt costs ~7 lookups).
        """
        low, high = 0, len(keys)  # invariant: keys[:low] present, keys[high:] absent
        while low < high:
            mid = (low + high + 1) // 2
            if self._present(keys[mid - 1], now):
                low = mid
            else:
                high = mid - 1
        return low

    def _present(self, key: int, now: float) -> bool:
        expiry = self._expiry.get(key)
        if expiry is None:
            return False
        if expiry <= now:
            del self._expiry[key]
            return False
        return True

    def record(self, keys: Sequence[int], now: float) -> None:
        """Remember a prompt sent to this endpoint (its blocks are refreshed if already there).

        Keys go in last block first, so a prompt's first block is its most recently used: like
        vLLM, which frees a sequence's tail blocks first, eviction takes the tail of a prefix
        before its head, and whatever remains of a prompt is always a prefix of it (``match``
        relies on that).
        """
        expiry = now + self.ttl_s
        if keys:
            # The same prompt again within a tenth of the TTL (a hot shared prefix): its whole chain
            # is there and fresh enough, so skip the refresh that would cost a write per block.
            tail = self._expiry.get(keys[-1])
            if tail is not None and tail >= expiry - self.ttl_s / 10:
                return
        for key in reversed(keys):
            self._expiry[key] = expiry
            self._expiry.move_to_end(key)
        while len(self._expiry) > self.max_blocks:
            self._expiry.popitem(last=False)
        # the oldest entries expire first: drop them while we are here, a few at a time
        for _ in range(8):
            if not self._expiry:
                break
            key, oldest = next(iter(self._expiry.items()))
            if oldest > now:
                break
            del self._expiry[key]

    def clear(self) -> None:
        self._expiry.clear()


# --- the choice ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Candidate:
    """One healthy endpoint as the choice sees it."""

    #: its root URL: the order and hash key
    name: str
    #: leading blocks of this prompt it probably holds (``PrefixIndex.match``)
    cached_blocks: int = 0
    #: tokens of work ahead of a new request there (the optional ``load_guard`` cap compares these)
    queued_tokens: float = 0.0
    in_flight: int = 0
    #: what is queued and running there, and its fitted cost model (``auto``)
    load: EndpointLoad = field(default_factory=EndpointLoad)
    coefficients: Coefficients = DEFAULTS


@dataclass(frozen=True, slots=True)
class Ask:
    """What the choice needs of a request."""

    prompt_tokens: int
    #: the client's ``x-interlock-session``
    session: str | None = None
    #: the conversation's opening (``conversation_hash`` without a session)
    conversation: str = ""


@dataclass(frozen=True, slots=True)
class Decision:
    """The endpoint chosen, and (``auto``) every candidate's expected TTFT, by name."""

    chosen: Candidate
    estimates: dict[str, Estimate]
    #: the chosen endpoint's expected cached prefix, in tokens
    cached_tokens: float = 0.0


def choose(
    routing: Routing,
    candidates: Sequence[Candidate],
    ask: Ask,
    *,
    block_tokens: float,
    rng: random.Random,
    turn: int = 0,
    load_guard: float | None = None,
) -> Candidate:
    """The endpoint a request goes to; ``turn`` counts the calls, for ``round_robin``."""
    return decide(
        routing, candidates, ask, block_tokens=block_tokens, rng=rng, turn=turn, load_guard=load_guard
    ).chosen


def decide(
    routing: Routing,
    candidates: Sequence[Candidate],
    ask: Ask,
    *,
    block_tokens: float,
    rng: random.Random,
    turn: int = 0,
    load_guard: float | None = None,
) -> Decision:
    """``choose``, with the figures behind it.

    ``auto``: the lowest expected time to first token (``backends.vllm.cost``) wins. Estimates
    within one block's prefill time of the best are a tie, won by the longest cached prefix, then
    by the session key through rendezvous hashing (every replica alike), else ``rng``.
    ``load_guard``, when set, is a hard cap: an endpoint whose queued tokens exceed the least
    queued's by more is left out.
    """
    ordered = sorted(candidates, key=lambda c: c.name)
    if routing == "round_robin":
        return Decision(ordered[turn % len(ordered)], {})
    if routing == "conversation_hash":
        return Decision(ordered[rendezvous(ask.session or ask.conversation, [c.name for c in ordered])], {})
    if routing == "least_in_flight":
        fewest = min(c.in_flight for c in ordered)
        return Decision(rng.choice([c for c in ordered if c.in_flight == fewest]), {})
    pool = ordered
    if load_guard is not None:
        least = min(c.queued_tokens for c in ordered)
        pool = [c for c in ordered if c.queued_tokens - least <= load_guard]
    estimates = {}
    for c in ordered:
        cached = min(float(ask.prompt_tokens), c.cached_blocks * block_tokens)
        estimates[c.name] = expected_ttft(c.coefficients, c.load, ask.prompt_tokens - cached, cached)
    best = min(estimates[c.name].ttft_s for c in pool)
    tie = block_tokens * min(c.coefficients.prefill_s_per_token for c in pool)
    near = [c for c in pool if estimates[c.name].ttft_s <= best + tie]
    # Among equals, the endpoint holding the longest prefix: moving a conversation that gains
    # nothing by it costs the cache it leaves behind (its later turns' hits, a second copy's KV).
    longest = max(c.cached_blocks for c in near)
    near = [c for c in near if c.cached_blocks == longest]
    if len(near) == 1:
        chosen = near[0]
    elif ask.session:
        chosen = near[rendezvous(ask.session, [c.name for c in near])]
    else:
        chosen = rng.choice(near)
    return Decision(chosen, estimates, min(float(ask.prompt_tokens), chosen.cached_blocks * block_tokens))
