"""What a client is told of its limits: ``x-ratelimit-*`` headers, and the error of a refusal.

The headers are OpenAI's (``x-ratelimit-limit-requests``, ``-remaining-``, ``-reset-``, and the
same for tokens), of the tightest scope of each kind. A refusal names the check that refused
(the one that waits longest, or one the request can never fit), its scope and limit, and the
exact wait: ``RateLimited`` (429, ``rate_limit_exceeded``) or, for a dollar budget,
``QuotaExceeded`` (429, ``insufficient_quota``).
"""

from __future__ import annotations

import math

from gateway.errors import QuotaExceeded, RateLimited
from gateway.limits import Decision


def duration(seconds: float) -> str:
    """OpenAI's form of ``x-ratelimit-reset-*``: ``20ms``, ``1.5s``, ``6m0s``."""
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    return f"{minutes}m{text}" if minutes else text


def rate_headers(decision: Decision) -> list[tuple[bytes, bytes]]:
    """``x-ratelimit-*-requests`` and ``-tokens`` of the tightest scope of each."""
    out: list[tuple[bytes, bytes]] = []
    for kind, name in (("rpm", b"requests"), ("tpm", b"tokens")):
        pairs = [(c, v) for c, v in zip(decision.checks, decision.verdicts, strict=True) if c.kind == kind]
        if not pairs:
            continue
        check, verdict = min(pairs, key=lambda p: p[1].remaining / p[0].limit)
        out += [
            (b"x-ratelimit-limit-" + name, str(int(check.limit)).encode()),
            (b"x-ratelimit-remaining-" + name, str(max(0, math.floor(verdict.remaining))).encode()),
            (b"x-ratelimit-reset-" + name, duration(verdict.reset_s).encode()),
        ]
    return out


_UNITS = {"rpm": "requests per minute", "tpm": "tokens per minute", "parallel": "requests in parallel"}


def refusal(decision: Decision) -> RateLimited:
    """The error for a refused decision: the refusing check that waits longest names itself."""
    refused = [(c, v) for c, v in zip(decision.checks, decision.verdicts, strict=True) if not v.ok]
    # a request that can never fit says so first; otherwise the check that waits longest
    check, verdict = max(
        refused, key=lambda p: (p[0].kind != "parallel" and p[0].cost > p[0].limit, p[1].retry_s)
    )
    wait = verdict.retry_s
    if decision.tier == "fallback" and check.on_failure == "closed":
        return RateLimited(
            f"Rate limits of {check.scope} cannot be checked right now; retry in {duration(wait)}.",
            limit_type=check.kind,
            retry_after=wait,
        )
    if check.kind == "usd" and check.cost > check.limit:
        return QuotaExceeded(
            f"This request could cost up to ${check.cost:.6f}, more than the whole spending budget of "
            f"{check.scope} (${check.limit:g} per {duration(check.period_s)}). Lower max_tokens.",
            retry_after=check.period_s,
        )
    if check.kind == "usd":
        return QuotaExceeded(
            f"The spending budget of {check.scope} is used up: ${check.limit:g} per "
            f"{duration(check.period_s)}, this request reserves ${check.cost:.6f}; "
            f"it refills enough in {duration(wait)}.",
            retry_after=wait,
        )
    if check.kind == "tpm" and check.cost > check.limit:
        return RateLimited(
            f"Request too large for {check.scope} on tokens per minute: limit {int(check.limit)}, "
            f"requested {int(check.cost)} (prompt estimate + max_tokens). Lower max_tokens.",
            limit_type="tpm",
            retry_after=wait,
        )
    used = check.cost if check.kind == "tpm" else 1
    return RateLimited(
        f"Rate limit reached for {check.scope} on {_UNITS[check.kind]}: limit {int(check.limit)}, "
        f"requested {int(used)}. Please try again in {duration(wait)}.",
        limit_type=check.kind,
        retry_after=wait,
    )
