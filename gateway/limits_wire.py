"""A pipelined Redis client on one connection, for the limit scripts on the request path.

redis-py's asyncio client spends about 150 us of CPU per call on this path (a pool checkout with
its lock and liveness check, argument encoding, a stream ``writelines``), more than the round
trip itself; at 1,000 requests a second that is what the limits added to the p99. Here every
command is written straight to one socket and its reply is matched in order (Redis answers a
connection's commands in the order they came), parsed by hiredis: about 40 us a call.

Several commands can go in one write (``send``): a request's admission carries the settlements
queued since the last one. A caller that stops waiting (a timeout) leaves its place in the queue;
its reply is read and dropped when it comes, so the connection never falls out of step, and
nothing is reconnected for it. A lost connection fails every command waiting on it
(``ConnectionError``) and the next call connects again. ``EVALSHA`` of a script the server has
not seen (a restart, a ``SCRIPT FLUSH``) is sent again as ``EVAL``, transparently.

Only plain ``redis://host:port/db`` URLs (with a user and password or not) are served here
(``for_url``); TLS, Unix sockets and Cluster stay with redis-py.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import deque
from collections.abc import Sequence
from typing import Any, cast

import hiredis

log = logging.getLogger("interlock.limits")

#: one command: its words (bytes, str, int or float; floats as ``repr``, the way redis-py sends them)
Command = Sequence[bytes | str | int | float]

_SUPPORTED = {"host", "port", "db", "username", "password"}


class ReplyError(Exception):
    """Redis answered a command with an error."""


def pack(commands: Sequence[Command]) -> bytes:
    """``commands`` in RESP, ready for one write."""
    out: list[bytes] = []
    for command in commands:
        out.append(b"*%d\r\n" % len(command))
        for word in command:
            if isinstance(word, bytes):
                data = word
            elif isinstance(word, str):
                data = word.encode()
            elif isinstance(word, float):
                data = repr(word).encode()
            else:
                data = b"%d" % word
            out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Waiting:
    """A command sent and not answered yet: who waits (None: nobody), and what it was."""

    __slots__ = ("command", "future")

    def __init__(self, future: asyncio.Future[Any] | None, command: Command) -> None:
        self.future = future
        self.command = command


class _Protocol(asyncio.Protocol):
    def __init__(self, client: WireClient) -> None:
        self.client = client
        self.reader = hiredis.Reader()
        self.waiting: deque[_Waiting] = deque()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:  # not Redis speaking: nothing more can be matched
                assert self.transport is not None
                self.transport.close()
                self.connection_lost(exc)
                return
            if reply is False:
                return
            if not self.waiting:  # a reply nobody asked for: the stream is out of step
                assert self.transport is not None
                self.transport.close()
                return
            self._answer(self.waiting.popleft(), reply)

    def _answer(self, waiting: _Waiting, reply: Any) -> None:
        if isinstance(reply, hiredis.ReplyError):
            text = str(reply)
            if text.startswith("NOSCRIPT") and self.client.resend(self, waiting):
                return
            future = waiting.future
            if future is None:
                self.client.dropped += 1
                log.debug("limits: redis answered %s with %s", waiting.command[0], text)
            elif not future.done():
                future.set_exception(ReplyError(text))
            return
        future = waiting.future
        if future is not None and not future.done():
            future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        waiting, self.waiting = self.waiting, deque()
        for entry in waiting:
            if entry.future is not None and not entry.future.done():
                entry.future.set_exception(ConnectionError(f"redis connection lost: {exc or 'closed'}"))
        self.client.lost(self)


class WireClient:
    """``call`` one or more commands and get the last one's reply; ``send`` without waiting."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        connect_timeout_s: float = 0.5,
        scripts: Sequence[str] = (),
    ) -> None:
        self.host, self.port, self.db = host, port, db
        self.username, self.password = username, password
        self.connect_timeout_s = connect_timeout_s
        #: sha1 -> text: loaded on every connection, and what a NOSCRIPT is answered with
        self.scripts: dict[str, str] = {}
        for text in scripts:
            self.scripts[hashlib.sha1(text.encode()).hexdigest()] = text
        #: replies to ``send`` that were errors (logged at debug)
        self.dropped = 0
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    def for_url(cls, url: str, *, connect_timeout_s: float, scripts: Sequence[str]) -> WireClient | None:
        """A client for ``url``, or None where this client does not speak what it asks for."""
        from redis.asyncio.connection import parse_url

        try:
            options = parse_url(url)
        except ValueError:
            return None
        if not set(options) <= _SUPPORTED or "host" not in options:
            return None
        return cls(
            options["host"],
            int(options.get("port", 6379)),
            db=int(options.get("db", 0)),
            username=options.get("username"),
            password=options.get("password"),
            connect_timeout_s=connect_timeout_s,
            scripts=scripts,
        )

    @property
    def connected(self) -> bool:
        return self._protocol is not None and self._protocol.transport is not None

    # -- commands -------------------------------------------------------------------------------

    def send(self, commands: Sequence[Command], *, reply: bool = False) -> asyncio.Future[Any] | None:
        """Write ``commands`` now, in one write; the last one's reply as a future if ``reply``.
        Raises ``ConnectionError`` when not connected (``call`` connects)."""
        protocol = self._protocol
        if protocol is None or protocol.transport is None:
            raise ConnectionError("redis not connected")
        future: asyncio.Future[Any] | None = None
        for i, command in enumerate(commands):
            if reply and i == len(commands) - 1:
                future = asyncio.get_running_loop().create_future()
            protocol.waiting.append(_Waiting(future, command))
        protocol.transport.write(pack(commands))
        return future

    async def call(self, *commands: Command) -> Any:
        """Send ``commands`` in one write and return the last one's reply (raises ``ReplyError``
        for an error reply, ``ConnectionError``/``OSError`` when Redis cannot be reached)."""
        if not self.connected:
            await self.connect()
        future = self.send(commands, reply=True)
        assert future is not None
        return await future

    async def ping(self) -> bool:
        return bool(await self.call((b"PING",)))

    async def aclose(self) -> None:
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()

    # -- the connection -------------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect (authenticate, select, load the scripts) unless connected; one attempt at a time."""
        if self.connected:
            return
        if self._closed:
            raise ConnectionError("redis client closed")
        if self._connecting is None:  # one attempt at a time, whoever asks
            self._connecting = asyncio.create_task(self._open())
        # shielded: a caller that times out leaves the attempt to the next one
        await asyncio.shield(self._connecting)

    async def _open(self) -> None:
        try:
            protocol = await self._handshake()
        finally:
            self._connecting = None
        if self._closed:  # closed while connecting
            assert protocol.transport is not None
            protocol.transport.close()
            raise ConnectionError("redis client closed")
        self._protocol = protocol

    async def _handshake(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.connect_timeout_s):
            _, protocol = await loop.create_connection(lambda: _Protocol(self), self.host, self.port)
        assert protocol.transport is not None
        hello: list[Command] = []
        if self.password is not None:
            hello.append(
                (b"AUTH", self.username, self.password) if self.username else (b"AUTH", self.password)
            )
        if self.db:
            hello.append((b"SELECT", self.db))
        hello += [(b"SCRIPT", b"LOAD", text) for text in self.scripts.values()]
        futures = []
        for command in hello:  # each checked: a wrong password must fail here, not later
            future = loop.create_future()
            protocol.waiting.append(_Waiting(future, command))
            futures.append(future)
        if hello:
            protocol.transport.write(pack(hello))
            try:
                async with asyncio.timeout(self.connect_timeout_s):
                    await asyncio.gather(*futures)
            except BaseException:
                protocol.transport.close()
                raise
        return protocol

    def resend(self, protocol: _Protocol, waiting: _Waiting) -> bool:
        """Answer a NOSCRIPT: the same script by its text, for the same waiter."""
        command = waiting.command
        if protocol.transport is None or command[0] != b"EVALSHA" or not isinstance(command[1], str):
            return False
        text = self.scripts.get(command[1])
        if text is None:
            return False
        again = (b"EVAL", text, *command[2:])
        protocol.waiting.append(_Waiting(waiting.future, again))
        protocol.transport.write(pack([again]))
        return True

    def lost(self, protocol: _Protocol) -> None:
        if self._protocol is protocol:
            self._protocol = None
