"""Which routing config each replica serves, so that a replica that diverges is seen.

Nothing of its own goes to Redis: every fleet heartbeat (``gateway.fleet``) carries the hash of
the snapshot in force, and this is the view of what the last heartbeat read. ``/admin/config``
shows the replicas by hash and which ones differ from this one; ``/metrics`` has
``interlock_config_replicas{hash}`` (replicas seen per hash) and
``interlock_config_diverging_replicas``. A reload asks for a heartbeat at the fleet's next tick
(``publish_soon``), so the others see the new hash within about a second. Without Redis, or
while it is gone, the view is this replica alone, or what was seen last, and says why.
"""

from __future__ import annotations

from gateway.fleet import replica_id
from gateway.state import Gateway


class ConfigPeers:
    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    @property
    def replica_id(self) -> str:
        fleet = self._gateway.fleet
        return fleet.id if fleet is not None else replica_id()

    def publish_soon(self) -> None:
        if self._gateway.fleet is not None:
            self._gateway.fleet.beat_soon()

    def _seen(self) -> dict[str, str]:
        """Replica → hash, this one's as in force now (a reload may be newer than the last beat)."""
        fleet = self._gateway.fleet
        live = fleet.live_replicas() if fleet is not None else []
        seen = {r.id: r.config_hash for r in live if r.config_hash}
        seen[self.replica_id] = self._gateway.snapshot.hash
        return seen

    def diverging(self) -> list[str]:
        """The replicas serving a config other than this one's."""
        mine = self._gateway.snapshot.hash
        return sorted(name for name, found in self._seen().items() if found != mine)

    def by_hash(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for found in self._seen().values():
            counts[found] = counts.get(found, 0) + 1
        return counts

    def view(self) -> dict[str, object]:
        """What ``/admin/config`` shows."""
        fleet = self._gateway.fleet
        status = fleet.status() if fleet is not None else "solo"
        return {
            "replica_id": self.replica_id,
            "replicas": dict(sorted(self._seen().items())),
            "diverging": self.diverging(),
            "fleet": status,
            "error": None if status in ("ok", "solo") else status,
        }
