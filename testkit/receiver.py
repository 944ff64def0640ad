"""A webhook receiver for tests and benchmarks: a real aiohttp server on a loopback address that answers each
POST as scripted (a status with headers, or a hang until released) and records what it got."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

HANG = -1  # an answer that holds the request open until `release()`
SLOW = -2  # an answer of 200 after SLOW_S: an attempt in flight for a while
SLOW_S = 1.0
ENDLESS = -3  # an answer of 200 whose body never ends: written until the sender goes away
ENDLESS_CHUNK = b"x" * 65536


@dataclass(frozen=True)
class Hit:
    """One request as received: path, headers (lower-case names), body, arrival (time.monotonic and time.time)."""

    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    wall: float


@dataclass
class Receiver:
    """Answers the k-th request with `answers[k]` (then 200): a status, a (status, headers) pair, HANG, SLOW or
    ENDLESS (`streamed` counts the bytes of endless bodies written, `hung_up` is set once a sender closed one)."""

    answers: list[int | tuple[int, dict[str, str]]] = field(default_factory=list)
    host: str = "127.0.0.1"
    hits: list[Hit] = field(default_factory=list)
    on_hit: Callable[[Hit], None] | None = None
    streamed: int = 0
    hung_up: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None
    _port: int = 0
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _released: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._port}/hook"

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        self._port = self._runner.addresses[0][1]
        return self

    async def close(self) -> None:
        self._released.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def release(self) -> None:
        """Let every hanging request go (answered 200)."""
        self._released.set()

    async def wait_for(self, count: int, timeout_s: float = 30.0) -> list[Hit]:
        """The hits once there are at least `count` of them."""
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: len(self.hits) >= count)
        return list(self.hits)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        hit = Hit(request.path, {k.lower(): v for k, v in request.headers.items()}, await request.read(), 0.0, 0.0)
        hit = Hit(hit.path, hit.headers, hit.body, time.monotonic(), time.time())
        index = len(self.hits)
        async with self._changed:
            self.hits.append(hit)
            self._changed.notify_all()
        if self.on_hit is not None:
            self.on_hit(hit)
        answer = self.answers[index] if index < len(self.answers) else 200
        if answer == HANG:
            await self._released.wait()
            return web.Response(status=200)
        if answer == ENDLESS:
            return await self._endless(request)
        if answer == SLOW:
            await asyncio.sleep(SLOW_S)
            return web.Response(status=200)
        status, headers = answer if isinstance(answer, tuple) else (answer, {})
        return web.Response(status=status, headers=headers)

    async def _endless(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=200)
        await response.prepare(request)
        try:
            while True:  # until the sender closes the connection
                await response.write(ENDLESS_CHUNK)
                self.streamed += len(ENDLESS_CHUNK)
        except ConnectionError:
            self.hung_up.set()
        return response
