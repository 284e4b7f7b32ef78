"""The vLLM pool's last routing decisions, for ``/admin/routes`` and the debug log.

Each entry names the request, the endpoint chosen, the cached prefix expected there and every
endpoint's expected TTFT with its parts (wait, own prefill, the prefill its cache saves), so a
slow request can be traced to the decision that sent it where it went.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

from backends.vllm.affinity import Decision

log = logging.getLogger("interlock.backends.vllm")

#: routing decisions kept for ``/admin/routes``
DECISIONS_KEPT = 64


class DecisionLog:
    """The last ``DECISIONS_KEPT`` decisions of one pool, newest last."""

    def __init__(self, pool: str) -> None:
        self.pool = pool
        self._entries: deque[dict[str, Any]] = deque(maxlen=DECISIONS_KEPT)

    def record(
        self,
        decision: Decision,
        *,
        routing: str,
        endpoint_url: str,
        urls: Mapping[str, str],
        request_id: str,
        prompt_tokens: int,
    ) -> None:
        """``decision`` sent a request of ``prompt_tokens`` to ``endpoint_url``; ``urls``: every
        endpoint's public URL by its root (the name the estimates go by)."""
        estimates = [
            {
                "url": urls.get(name, name),
                "expected_ttft_ms": round(est.ttft_s * 1000, 2),
                "wait_ms": round(est.wait_s * 1000, 2),
                "prefill_ms": round(est.prefill_s * 1000, 2),
                "saved_ms": round(est.saved_s * 1000, 2),
                "cached_tokens": round(est.cached_tokens),
                "prefill_ahead_tokens": round(est.features[1] - est.uncached_tokens),
                "running": round(est.features[2], 1),
                "full_wait_steps": round(est.features[3], 1),
            }
            for name, est in sorted(decision.estimates.items())
        ]
        entry = {
            "at": round(time.time(), 3),
            "request_id": request_id,
            "routing": routing,
            "endpoint": endpoint_url,
            "prompt_tokens": prompt_tokens,
            "expected_cached_tokens": round(decision.cached_tokens),
            "estimates": estimates,
        }
        self._entries.append(entry)
        if log.isEnabledFor(logging.DEBUG):
            waits = ", ".join(
                f"{e['url']} {e['expected_ttft_ms']:.1f} ms (wait {e['wait_ms']:.1f}, prefill "
                f"{e['prefill_ms']:.1f}, cache saves {e['saved_ms']:.1f})"
                for e in estimates
            )
            log.debug(
                "vllm pool %s: request %s -> %s, expected cached prefix %d of %d tokens; expected TTFT: %s",
                self.pool,
                request_id,
                endpoint_url,
                entry["expected_cached_tokens"],
                prompt_tokens,
                waits or "n/a (" + routing + ")",
            )

    def last(self, n: int = DECISIONS_KEPT) -> list[dict[str, Any]]:
        """The last ``n`` decisions, oldest first."""
        return list(self._entries)[-n:]
