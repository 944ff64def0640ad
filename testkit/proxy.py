"""A TCP proxy in front of Redis that a fault injector controls: lost replies, killed connections,
partitions and delay, for the connections of one client process.

Give a process the proxy's port in its `--redis-url` and every byte it exchanges with Redis passes
through here. The controls act on what a network can do to a connection, at the moment a harness
chooses:

- `drop_reply(rule)`: forward a command to Redis, then cut the connection instead of forwarding Redis's
  answer: the write happened, the client never hears of it, and redis-py retries the command.
- `pause_after(rule)`: forward the matching reply, then partition: the client is frozen between two
  commands, for a test to act in between (a race made deterministic).
- `kill(pubsub_only=...)`: close connections at once (a reset, a restart of a middlebox); a connection
  counts as pub/sub once its client has sent SUBSCRIBE or PSUBSCRIBE.
- `partition()` / `heal()`: a black hole. Nothing moves in either direction, new connections are accepted
  but never reach Redis; on heal, held bytes flow again (what a cut cable does, short of TCP timeouts).
  `partition(refuse=True)`: every connection reset, new ones too, until healed.
- `delay_s`: every chunk waits this long before it is forwarded.

All on 127.0.0.1. A connection whose other side closes is closed too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

CHUNK = 65536
CONNECT_TIMEOUT_S = 5.0
_SUBSCRIBE = (b"SUBSCRIBE", b"PSUBSCRIBE", b"SSUBSCRIBE")


@dataclass(frozen=True)
class DropRule:
    """Which reply to lose: the first reply to `command` (any command if empty; any one of several, given
    a tuple) whose bytes contain `reply_contains` (any reply if empty). Matching is on the raw RESP bytes,
    case-sensitive (redis-py sends command names in capitals); a reply is the next bytes Redis sends on the
    connection after the command (redis-py does not pipeline outside MULTI/EXEC, where the whole transaction
    counts as one)."""

    command: bytes | tuple[bytes, ...] = b""
    reply_contains: bytes = b""

    def sent_in(self, data: bytes) -> bool:
        """Whether `data`, bytes a client sent, carry the rule's command."""
        commands = self.command if isinstance(self.command, tuple) else (self.command,)
        return any(command in data for command in commands)


@dataclass(eq=False)
class _Trigger:
    """An armed rule: what to do when it matches (`drop` the reply, or forward it and then `pause`: black-hole
    the proxy), and an event set when it has."""

    rule: DropRule
    action: str = "drop"
    spent: bool = False  # matched a reply: it acts on no other
    fired: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class ProxyStats:
    """What a proxy did, for the fault report."""

    connections: int = 0
    replies_dropped: int = 0
    killed: int = 0
    refused_while_partitioned: int = 0


@dataclass(eq=False)
class _Link:
    """One proxied connection: both sockets, and what the client has shown of itself."""

    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    pubsub: bool = False
    in_flight: bytes = b""  # what the client sent since the last reply it was given
    armed: list[_Trigger] = field(default_factory=list)  # rules whose command this link has sent

    def close(self) -> None:
        for writer in (self.client, self.server):
            with contextlib.suppress(Exception):
                writer.transport.abort()  # a reset: no lingering, no graceful FIN handshake


class FaultProxy:
    """A TCP proxy from a local port to a Redis port, with fault controls. `start()` before use."""

    def __init__(self, name: str, upstream_port: int, host: str = "127.0.0.1") -> None:
        self.name = name
        self.upstream_port = upstream_port
        self.host = host
        self.delay_s = 0.0
        self.stats = ProxyStats()
        self._rules: list[_Trigger] = []
        self._watched: list[tuple[bytes, asyncio.Event]] = []
        self._links: set[_Link] = set()
        self._open = asyncio.Event()
        self._open.set()
        self._refusing = False
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None, "start() the proxy first"
        return int(self._server.sockets[0].getsockname()[1])

    def url(self, db: int = 0) -> str:
        return f"redis://{self.host}:{self.port}/{db}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, 0)

    async def close(self) -> None:
        """Stop accepting, reset every connection, and wait for the pumps to end (bounded)."""
        if self._server is not None:
            self._server.close()
        self.delay_s = 0.0
        self.heal()  # held pumps wake up and find their sockets reset
        self.kill()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=CONNECT_TIMEOUT_S + 1.0)
        for task in list(self._tasks):
            task.cancel()

    # --- Controls

    def drop_reply(self, rule: DropRule = DropRule()) -> asyncio.Event:
        """Lose the next reply matching `rule` (once); the event is set when it has been lost. A command
        already sent and waiting for its reply (a blocking read) counts as sent after this call."""
        return self._add(_Trigger(rule))

    def pause_after(self, rule: DropRule) -> asyncio.Event:
        """Forward the next reply matching `rule`, then partition the proxy (until `heal()`), and set the
        event: the client is frozen between two commands, for a test to act in between."""
        return self._add(_Trigger(rule, action="pause"))

    def sent(self, command: bytes) -> asyncio.Event:
        """An event set once a client has sent bytes containing `command` and they went on to Redis."""
        event = asyncio.Event()
        self._watched.append((command, event))
        return event

    def _add(self, trigger: _Trigger) -> asyncio.Event:
        self._rules.append(trigger)
        for link in self._links:
            if trigger.rule.sent_in(link.in_flight):
                link.armed.append(trigger)
        return trigger.fired

    def disarm(self) -> None:
        """Forget every drop rule that has not fired."""
        self._rules.clear()
        for link in self._links:
            link.armed.clear()

    @property
    def pending_drops(self) -> int:
        """Rules armed and not yet fired."""
        return len(self._rules)

    def kill(self, pubsub_only: bool = False) -> int:
        """Reset every connection (or every pub/sub one); returns how many."""
        doomed = [link for link in self._links if link.pubsub or not pubsub_only]
        for link in doomed:
            self._drop(link)
        self.stats.killed += len(doomed)
        return len(doomed)

    def partition(self, refuse: bool = False) -> None:
        """Black-hole the traffic until `heal()`; with `refuse`, reset every connection instead and every new
        one at once (a host that answers with resets rather than silence)."""
        self._open.clear()
        self._refusing = refuse
        if refuse:
            self.kill()

    def heal(self) -> None:
        self._refusing = False
        self._open.set()

    @property
    def partitioned(self) -> bool:
        return not self._open.is_set()

    # --- Plumbing

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        self._track(asyncio.current_task())  # type: ignore[arg-type]
        if self._refusing:
            self.stats.refused_while_partitioned += 1
            writer.transport.abort()
            return
        await self._open.wait()  # a partitioned host: the connection is accepted and goes nowhere
        try:
            server_reader, server_writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.upstream_port), CONNECT_TIMEOUT_S
            )
        except (OSError, TimeoutError):
            writer.transport.abort()  # Redis is down: the client sees its connection fail, as it would
            return
        link = _Link(client=writer, server=server_writer)
        self._links.add(link)
        pumps = [
            self._spawn(self._client_to_server(reader, link)),
            self._spawn(self._server_to_client(server_reader, link)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._drop(link)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        return self._track(asyncio.create_task(coroutine))

    def _track(self, task: asyncio.Task[None]) -> asyncio.Task[None]:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _drop(self, link: _Link) -> None:
        if link in self._links:
            self._links.discard(link)
            link.close()

    async def _client_to_server(self, reader: asyncio.StreamReader, link: _Link) -> None:
        while chunk := await self._read(reader):
            await self._hold()
            if any(name in chunk.upper() for name in _SUBSCRIBE):
                link.pubsub = True
            link.in_flight += chunk
            self._arm(link, chunk)
            if not await self._forward(link.server, chunk):
                return
            for command, event in self._watched:
                if command in chunk:
                    event.set()
            self._watched = [(command, event) for command, event in self._watched if not event.is_set()]

    async def _server_to_client(self, reader: asyncio.StreamReader, link: _Link) -> None:
        while chunk := await self._read(reader):
            await self._hold()
            trigger = self._fire(link, chunk)
            if trigger is not None and trigger.action == "drop":
                self.stats.replies_dropped += 1
                logger.info("proxy %s: dropped a reply after Redis answered", self.name)
                trigger.fired.set()
                return
            if not await self._forward(link.client, chunk):
                return
            link.in_flight = b""  # answered: a rule armed by its command waits for the next one
            link.armed.clear()
            if trigger is not None:  # pause: the reply went through, nothing after it does
                self.partition()
                trigger.fired.set()

    @staticmethod
    async def _forward(writer: asyncio.StreamWriter, chunk: bytes) -> bool:
        try:
            writer.write(chunk)
            await writer.drain()
        except (ConnectionError, OSError):
            return False
        return True

    @staticmethod
    async def _read(reader: asyncio.StreamReader) -> bytes:
        try:
            return await reader.read(CHUNK)
        except (ConnectionError, OSError):
            return b""

    async def _hold(self) -> None:
        """Wait out a partition and the configured delay before forwarding."""
        await self._open.wait()
        if self.delay_s > 0:
            await asyncio.sleep(self.delay_s)
        await self._open.wait()

    def _arm(self, link: _Link, chunk: bytes) -> None:
        """A rule watches a link's replies once the client sends the rule's command over it."""
        for trigger in self._rules:
            if trigger.rule.sent_in(chunk) and trigger not in link.armed:
                link.armed.append(trigger)

    def _fire(self, link: _Link, chunk: bytes) -> _Trigger | None:
        """The rule this reply fires, if any: each fires once, on whichever link matches first."""
        link.armed = [t for t in link.armed if not t.spent]
        for trigger in link.armed:
            if trigger.rule.reply_contains in chunk:
                trigger.spent = True
                link.armed.remove(trigger)
                self._rules = [t for t in self._rules if t is not trigger]
                return trigger
        return None
