"""Which routing config each replica serves, through Redis: so a replica that diverges is seen.

Every ``interval_s`` each replica writes the hash of the snapshot in force to its own key,
``{prefix}{replica id}``, with a TTL of three intervals (a replica that stops simply expires),
then reads every replica's key. ``/admin/config`` shows the replicas by hash and which ones
differ from this one; ``/metrics`` has ``interlock_config_replicas{hash}`` (replicas seen per
hash) and ``interlock_config_diverging_replicas``. A config swapped by a reload is published
at the next tick (``publish_soon`` wakes it at once).

Redis is an aid here as for the cache: when it cannot be reached the replica keeps serving,
the view says so (``error``) and keeps what it last saw. The keys share one hash tag, so the
scan and the read stay on one node of a Redis Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from typing import Any

import orjson

from gateway.cache_store import make_client
from gateway.state import Gateway

log = logging.getLogger("interlock.config_peers")

#: the hash tag keeps every replica's key in one Cluster slot
DEFAULT_PREFIX = "interlock:{config-peers}:"
#: each call's own budget: a slow Redis must not hold the loop's tick for long
_CALL_TIMEOUT_S = 1.0


def default_replica_id() -> str:
    """The host name (a pod's or a container's name) and the process id."""
    return f"{socket.gethostname()}-{os.getpid()}"


class ConfigPeers:
    def __init__(
        self,
        gateway: Gateway,
        redis_url: str,
        replica_id: str | None = None,
        *,
        prefix: str = DEFAULT_PREFIX,
        interval_s: float = 5.0,
    ) -> None:
        self._gateway = gateway
        self._url = redis_url
        self.replica_id = replica_id or default_replica_id()
        self.prefix = prefix
        self.interval_s = interval_s
        self.ttl_s = max(1, round(3 * interval_s))
        #: replica id → what it published ({"hash", "loaded_at", "seen_at"}), as last read
        self.replicas: dict[str, dict[str, Any]] = {}
        #: the last publish or read's error (None once one succeeds)
        self.error: str | None = None
        self.checked_at: float | None = None
        self._client: Any = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    async def start(self) -> None:
        self._client = make_client(self._url, _CALL_TIMEOUT_S)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._client is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(_CALL_TIMEOUT_S):
                    await self._client.delete(self.prefix + self.replica_id)  # gone now, not in 3 ticks
            with contextlib.suppress(Exception):
                await self._client.aclose()

    def publish_soon(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self.tick()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval_s):
                    await self._wake.wait()

    async def tick(self) -> None:
        """Publish this replica's hash, then read every replica's."""
        snapshot = self._gateway.snapshot
        mine = {"hash": snapshot.hash, "loaded_at": snapshot.loaded_at, "seen_at": time.time()}
        try:
            async with asyncio.timeout(_CALL_TIMEOUT_S):
                await self._client.set(self.prefix + self.replica_id, orjson.dumps(mine), ex=self.ttl_s)
                keys = [key async for key in self._client.scan_iter(match=self._pattern(), count=500)]
                values = await self._client.mget(keys) if keys else []
        except Exception as exc:  # Redis slow or gone: keep serving, say so, keep the last view
            if self.error is None:
                log.warning("config peers: Redis unusable: %s", exc)
            self.error = f"{type(exc).__name__}: {exc}"[:200]
            return
        replicas: dict[str, dict[str, Any]] = {}
        for key, value in zip(keys, values, strict=True):
            if value is None:
                continue  # expired between the scan and the read
            name = (key.decode() if isinstance(key, bytes) else key)[len(self.prefix) :]
            with contextlib.suppress(orjson.JSONDecodeError, TypeError):
                found = orjson.loads(value)
                if isinstance(found, dict) and isinstance(found.get("hash"), str):
                    replicas[name] = found
        replicas[self.replica_id] = mine
        self.replicas, self.error, self.checked_at = replicas, None, time.time()

    def _pattern(self) -> str:
        # the prefix's own glob characters ({ } are not glob syntax; * ? [ are) matched literally
        escaped = "".join("\\" + c if c in "*?[]\\" else c for c in self.prefix)
        return escaped + "*"

    def diverging(self) -> list[str]:
        """The replicas serving a config other than this one's."""
        mine = self._gateway.snapshot.hash
        return sorted(name for name, found in self._seen().items() if found != mine)

    def by_hash(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for found in self._seen().values():
            counts[found] = counts.get(found, 0) + 1
        return counts

    def _seen(self) -> dict[str, str]:
        """Replica → hash, this one's as in force now (a reload may be newer than the last tick)."""
        seen = {name: found["hash"] for name, found in self.replicas.items()}
        seen[self.replica_id] = self._gateway.snapshot.hash
        return seen

    def view(self) -> dict[str, object]:
        """What ``/admin/config`` shows."""
        return {
            "replica_id": self.replica_id,
            "replicas": dict(sorted(self._seen().items())),
            "diverging": self.diverging(),
            "checked_at": self.checked_at,
            "error": self.error,
        }
