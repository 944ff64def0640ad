"""Completions and job events for a gateway: one pub/sub subscription per process, fanned out in memory.

Requests that wait for a result and event streams that follow a job are told through this listener, not
through one Redis connection each. Pub/sub delivers at most once and redis-py re-subscribes silently, so the
stored results are the truth and messages only wake-ups: see `JobListener` and docs/delivery.md.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from common.protocol import JOB_ID_PATTERN
from common.redis_conn import UNAVAILABLE
from common.rediskeys import RedisKeys

logger = logging.getLogger(__name__)

# The listener checks the results of the requests it waits for this often, whatever pub/sub said, and is
# unhealthy when its connection has not been read for STALL_FACTOR times as long.
SWEEP_INTERVAL_S = 2.0
STALL_FACTOR = 3
BACKOFF_FIRST_S = 0.1
BACKOFF_CAP_S = 5.0


@dataclass(frozen=True)
class JobEvent:
    """What a watcher of a job is told: `started` (worker), `progress` (step, total), `finished` (the result
    is stored), or `resync` (the subscription was lost and restored: events may have been missed, re-read
    the job's state)."""

    type: str
    worker: str | None = None
    step: int | None = None
    total: int | None = None

    def well_formed(self) -> bool:
        """Whether an event read off the channel has the types its kind needs."""
        if self.type == "started":
            return isinstance(self.worker, str)
        if self.type == "progress":
            return _is_int(self.step) and _is_int(self.total)
        return False


RESYNC_EVENT = JobEvent(type="resync")


FINISHED_EVENT = JobEvent(type="finished")


class JobListener:
    """One pub/sub subscription per gateway process to completions and job events, fanned out in memory.

    Two kinds of interest: `expect(id)` is a future resolved when the job finishes (for requests that wait
    for a result), `watch(id)` an asyncio queue of every JobEvent of the job (for event streams).

    Pub/sub delivers at most once, and redis-py re-subscribes inside its own retry loop without raising, so
    the listener treats every subscribe confirmation Redis sends (the first and each silent re-subscribe)
    as a possible gap: it checks the stored results of the jobs it waits for, and tells every watcher to
    re-read its job's state. A sweep every `sweep_interval_s` checks the waiters again, in one pipelined
    round trip, whatever happened. A message that does not parse is logged, counted and skipped; any other
    failure is logged, counted and the listener starts again: it never dies silently (`health`).
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: RedisKeys,
        watch_queue_size: int = 256,
        on_completion: Callable[[], None] | None = None,
        sweep_interval_s: float = SWEEP_INTERVAL_S,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._on_completion = on_completion  # told of every completion in the cluster (throughput)
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._watchers: dict[str, set[asyncio.Queue[JobEvent]]] = {}
        self._watch_queue_size = watch_queue_size
        self._sweep_interval_s = sweep_interval_s
        self._completions = keys.completions_channel.encode()
        self._events = keys.job_events_channel.encode()
        self._running = False
        self._last_read = 0.0
        self.subscribed = asyncio.Event()
        # subscribed (each confirmation, re-subscriptions included), recovered (a completion found by a
        # re-check, not by its message), bad_message, restarted (after an unexpected error).
        self.counts: collections.Counter[str] = collections.Counter()

    def expect(self, job_id: str) -> asyncio.Future[None]:
        """Register interest in a job before submitting it; the future resolves when it finishes."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job_id, set()).add(future)
        return future

    def forget(self, job_id: str, future: asyncio.Future[None]) -> None:
        """Drop a waiter (finished, timed out or cancelled)."""
        _discard(self._waiters, job_id, future)

    def watch(self, job_id: str) -> asyncio.Queue[JobEvent]:
        """Every event of a job from now on; call before reading its state, and `unwatch` when done."""
        events: asyncio.Queue[JobEvent] = asyncio.Queue(self._watch_queue_size)
        self._watchers.setdefault(job_id, set()).add(events)
        return events

    def unwatch(self, job_id: str, events: asyncio.Queue[JobEvent]) -> None:
        _discard(self._watchers, job_id, events)

    @property
    def waiting(self) -> int:
        """How many requests are waiting for a result."""
        return sum(len(w) for w in self._waiters.values())

    @property
    def watching(self) -> int:
        """How many event streams are open."""
        return sum(len(w) for w in self._watchers.values())

    def health(self) -> str | None:
        """None while the listener runs, is subscribed and has read from its connection lately; else why not
        (for the gateway's /readyz)."""
        if not self._running:
            return "the job events listener is not running"
        if not self.subscribed.is_set():
            return "the job events subscription is being re-established"
        stalled = asyncio.get_running_loop().time() - self._last_read
        if stalled > STALL_FACTOR * self._sweep_interval_s:
            return f"the job events subscription has not been read for {stalled:.0f}s"
        return None

    async def run(self) -> None:
        """Listen until cancelled; start again with backoff when Redis goes away or anything else fails."""
        self._running = True
        backoff = BACKOFF_FIRST_S
        try:
            while True:
                subscriptions = self.counts["subscribed"]
                try:
                    await self._listen()
                except (*UNAVAILABLE, OSError) as exc:
                    logger.warning("job events subscription lost (%s); retrying", exc)
                except Exception:  # the listener's boundary: whatever it was, log it and listen again
                    logger.exception("job events listener failed; restarting")
                    self.counts["restarted"] += 1
                self.subscribed.clear()
                if self.counts["subscribed"] > subscriptions:  # it had worked: try again at once
                    backoff = BACKOFF_FIRST_S
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_CAP_S)
        finally:
            self._running = False
            self.subscribed.clear()

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        async with self._redis.pubsub() as pubsub:
            await pubsub.subscribe(self._completions, self._events)
            next_sweep = loop.time() + self._sweep_interval_s
            while True:
                message = await pubsub.get_message(timeout=max(0.0, next_sweep - loop.time()))
                self._last_read = loop.time()
                if message is not None:
                    await self._on_message(message)
                if loop.time() >= next_sweep:
                    await self._recheck()
                    next_sweep = loop.time() + self._sweep_interval_s

    async def _on_message(self, message: dict[str, Any]) -> None:
        kind, channel, data = message.get("type"), message.get("channel"), message.get("data")
        if kind == "subscribe" and channel == self._completions:
            self.subscribed.set()
            self.counts["subscribed"] += 1
            await self._recheck()
        elif kind == "subscribe" and channel == self._events:
            for job_id in list(self._watchers):
                self._tell(job_id, RESYNC_EVENT)
        elif kind == "message" and channel == self._completions:
            self._on_completed(data)
        elif kind == "message" and channel == self._events:
            self._on_job_event(data)

    def _on_completed(self, data: Any) -> None:
        job_id = _job_id_in(data)
        if job_id is None:
            self._bad("completion", data)
            return
        if self._on_completion is not None:
            self._on_completion()
        self._resolve(job_id)
        self._tell(job_id, FINISHED_EVENT)

    def _on_job_event(self, data: Any) -> None:
        try:
            event: Any = json.loads(data)
            job_id = _job_id_in(event["id"])
            parsed = JobEvent(
                type=event["type"], worker=event.get("worker"), step=event.get("step"), total=event.get("total")
            )
        except (ValueError, KeyError, TypeError):
            job_id, parsed = None, None
        if job_id is None or parsed is None or not parsed.well_formed():
            self._bad("job event", data)
            return
        self._tell(job_id, parsed)

    def _bad(self, what: str, data: Any) -> None:
        self.counts["bad_message"] += 1
        logger.warning("ignoring a malformed %s message: %r", what, data[:200] if isinstance(data, bytes) else data)

    def _tell(self, job_id: str, event: JobEvent) -> None:
        for events in self._watchers.get(job_id, ()):
            try:
                events.put_nowait(event)
            except asyncio.QueueFull:  # a stalled reader: it will re-read the state instead
                events.get_nowait()
                events.put_nowait(RESYNC_EVENT)

    async def _recheck(self) -> None:
        """Resolve every waiter whose job already has a stored result: one pipelined round trip."""
        job_ids = list(self._waiters)
        if not job_ids:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for job_id in job_ids:
                    pipe.exists(self._keys.result(job_id))
                found = await pipe.execute()
        except UNAVAILABLE as exc:  # the next sweep tries again
            logger.warning("could not re-check %d waiting job(s) (%s)", len(job_ids), exc)
            return
        for job_id, exists in zip(job_ids, found, strict=True):
            if exists and job_id in self._waiters:
                self.counts["recovered"] += 1
                self._resolve(job_id)
                self._tell(job_id, FINISHED_EVENT)

    def _resolve(self, job_id: str) -> None:
        for future in self._waiters.pop(job_id, ()):
            if not future.done():
                future.set_result(None)


def _discard(registry: dict[str, set[Any]], job_id: str, item: Any) -> None:
    items = registry.get(job_id)
    if items is not None:
        items.discard(item)
        if not items:
            del registry[job_id]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _job_id_in(value: object) -> str | None:
    """A job id read off a channel (bytes or str), or None when it is not one."""
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    if isinstance(value, str) and re.fullmatch(JOB_ID_PATTERN, value):
        return value
    return None
