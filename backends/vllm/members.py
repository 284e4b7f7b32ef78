"""Who is in a ``kind: vllm`` pool, who of them is healthy, and what each last reported.

The pool's membership comes from a static list or from a DNS name re-resolved every
``dns_refresh_s``. Each member has two watchers: ``GET /health`` every ``health_interval_s``
(or at once when a request failed there) and ``GET /metrics`` every ``scrape_interval_s``.
``backends.vllm`` routes over the healthy members and reports failures back through ``eject``
and ``Endpoint.wake``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from urllib.parse import urlsplit

from backends.http import HttpClient, OpenAICompatibleUpstream
from backends.http_timeouts import Timeouts
from backends.vllm.affinity import PrefixIndex
from backends.vllm.config import VllmConfig, split_host_port
from backends.vllm.cost import TtftFit
from backends.vllm.endpoint import Endpoint, public_url
from backends.vllm.metrics import MetricsSnapshot

log = logging.getLogger("interlock.backends.vllm")


class Members:
    def __init__(
        self,
        name: str,
        config: VllmConfig,
        http: HttpClient,
        *,
        headers: Mapping[str, str],
        secret: str,
        timeouts: Timeouts,
        clock: Callable[[], float],
    ) -> None:
        self.name = name
        self.config = config
        self._http = http
        self._headers = headers
        self._secret = secret
        self._timeouts = timeouts
        self._clock = clock
        self._probe_timeout = min(2.0, max(0.5, config.health_interval_s))
        self._scrape_timeout = min(5.0, max(1.0, config.scrape_interval_s))
        self._stale_after = max(3 * config.scrape_interval_s, 1.0)
        self._running = False
        self._tasks: list[asyncio.Task[None]] = []
        #: tasks of endpoints DNS removed, until their cancellation has run
        self._retired: set[asyncio.Task[None]] = set()
        self._endpoints: dict[str, Endpoint] = {}
        for root in config.endpoints or ():
            self._add(root)

    def __iter__(self) -> Iterator[Endpoint]:
        return iter(list(self._endpoints.values()))

    def __len__(self) -> int:
        return len(self._endpoints)

    def healthy(self, exclude: Sequence[Endpoint] = ()) -> list[Endpoint]:
        return [e for e in self._endpoints.values() if e.healthy and e not in exclude]

    def fresh(self, endpoint: Endpoint) -> MetricsSnapshot | None:
        """Its last scrape, unless that is more than three intervals old."""
        if endpoint.scraped_at is None or self._clock() - endpoint.scraped_at > self._stale_after:
            return None
        return endpoint.scrape

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        if self.config.dns is not None:
            await self.refresh_dns()
        # one check of every endpoint before serving, so readiness starts out right
        await asyncio.gather(*(self.check(e, may_restore=True) for e in self._endpoints.values()))
        self._running = True
        for endpoint in self._endpoints.values():
            self._watch(endpoint)
        if self.config.dns is not None:
            self._tasks.append(asyncio.create_task(self._dns_loop()))

    async def close(self) -> None:
        self._running = False
        tasks = [*self._tasks, *self._retired, *(t for e in self._endpoints.values() for t in e.tasks)]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()

    def _add(self, root: str) -> Endpoint:
        netloc = urlsplit(root).netloc
        upstream = OpenAICompatibleUpstream(
            http=self._http,
            base_url=root + "/v1",
            headers=dict(self._headers),
            timeouts=self._timeouts,
            secrets=tuple(s for s in (self._secret, root, netloc, self.config.dns) if s),
        )
        endpoint = Endpoint(
            root,
            upstream,
            PrefixIndex(self.config.prefix_ttl_s, self.config.prefix_index_blocks),
            TtftFit(self._clock),
        )
        self._endpoints[root] = endpoint
        if self._running:
            self._watch(endpoint)
        return endpoint

    def _watch(self, endpoint: Endpoint) -> None:
        endpoint.tasks = [
            asyncio.create_task(self._health_loop(endpoint)),
            asyncio.create_task(self._scrape_loop(endpoint)),
        ]

    def _remove(self, root: str) -> None:
        endpoint = self._endpoints.pop(root)
        for task in endpoint.tasks:  # requests in flight there finish on their own
            task.cancel()
            self._retired.add(task)
            task.add_done_callback(self._retired.discard)
        log.info("vllm pool %s: endpoint %s left (DNS)", self.name, endpoint.url)

    # -- DNS ------------------------------------------------------------------------------------

    async def refresh_dns(self) -> None:
        """Resolve ``dns`` now; addresses that appeared join the pool, those that vanished leave.
        A failed or empty answer keeps the pool as it is (a DNS hiccup must not empty it)."""
        assert self.config.dns is not None
        host, port = split_host_port(self.config.dns)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            log.warning("vllm pool %s: cannot resolve %s: %s", self.name, self.config.dns, exc)
            return
        addresses = {str(info[4][0]) for info in infos}
        if not addresses:
            return
        wanted = {f"http://[{a}]:{port}" if ":" in a else f"http://{a}:{port}" for a in addresses}
        for root in sorted(wanted - self._endpoints.keys()):
            self._add(root)
            log.info("vllm pool %s: endpoint %s joined (DNS)", self.name, public_url(root))
        for root in sorted(self._endpoints.keys() - wanted):
            self._remove(root)

    async def _dns_loop(self) -> None:
        while True:
            # an empty pool (the name did not resolve yet) asks again soon
            await asyncio.sleep(
                self.config.dns_refresh_s if self._endpoints else min(1.0, self.config.dns_refresh_s)
            )
            await self.refresh_dns()

    # -- health and scrapes ---------------------------------------------------------------------

    async def _health_loop(self, endpoint: Endpoint) -> None:
        while True:
            woken = False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.health_interval_s):
                    await endpoint.wake.wait()
                    woken = True
            endpoint.wake.clear()
            # A check woken by a failed request may take an endpoint out, never put it back: one
            # ejected for failing requests while /health passes returns at the next scheduled check.
            await self.check(endpoint, may_restore=not woken)

    async def check(self, endpoint: Endpoint, *, may_restore: bool) -> None:
        ejections = endpoint.ejections
        reason = await endpoint.probe(self._http.session, self._headers, self._probe_timeout)
        if reason is not None:
            self.eject(endpoint, reason)
        elif not endpoint.healthy and may_restore and endpoint.ejections == ejections:
            log.info("vllm pool %s: endpoint %s is back", self.name, endpoint.url)
            endpoint.restore()

    def eject(self, endpoint: Endpoint, reason: str) -> None:
        if endpoint.eject(reason):
            log.warning("vllm pool %s: endpoint %s leaves the rotation: %s", self.name, endpoint.url, reason)

    async def _scrape_loop(self, endpoint: Endpoint) -> None:
        while True:
            await endpoint.read_metrics(
                self._http.session, self._headers, self._scrape_timeout, self._clock()
            )
            await asyncio.sleep(self.config.scrape_interval_s)


__all__ = ["Members"]
