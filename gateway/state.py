"""The running gateway: the snapshot in force, and what lives as long as the process.

Every HTTP handler and the health checker hold this object, never a copy of what is in
it, and read ``snapshot`` when they need routes, targets or keys; replacing the snapshot
(``swap``) is one assignment, seen by the next request while the ones in flight keep theirs.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from backends.base import Backend
from gateway.cache import ResponseCache
from gateway.fleet import Fleet
from gateway.health import HealthMonitor
from gateway.limits import Limits
from gateway.router import Router
from gateway.snapshot import Snapshot


@dataclass
class Gateway:
    snapshot: Snapshot
    router: Router
    health: HealthMonitor
    #: the response cache (in-process, and Redis when configured); None: no route caches
    cache: ResponseCache | None = None
    #: per-key limits and budgets (``gateway.limits``); None: no limits at all (tests, embedding)
    limits: Limits | None = None
    #: the replicas sharing Redis (``live_replicas()``); None only before the app is built
    fleet: Fleet | None = None
    started_at: int = field(default_factory=lambda: int(time.time()))
    #: set when start-up of a backend failed; the server exits with it
    fatal: BaseException | None = None
    #: set once shutdown begins: readiness answers 503 while in-flight streams finish
    draining: bool = False

    @property
    def backends(self) -> Mapping[str, Backend]:
        return {name: target.backend for name, target in self.snapshot.targets.items()}

    def swap(self, snapshot: Snapshot) -> Snapshot:
        """Put ``snapshot`` in force; returns the one it replaced."""
        previous, self.snapshot = self.snapshot, snapshot
        return previous
