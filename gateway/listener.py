"""Completions and job events for a gateway: one pub/sub subscription per process, fanned out in memory.

Requests that wait for a result and event streams that follow a job are told through this listener, not
through one Redis connection each.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from common.redis_conn import UNAVAILABLE, text
from common.rediskeys import RedisKeys

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobEvent:
    """What a watcher of a job is told: `started` (worker), `progress` (step, total), `finished` (the result
    is stored), or `resync` (the subscription was lost and restored: events may have been missed, re-read
    the job's state)."""

    type: str
    worker: str | None = None
    step: int | None = None
    total: int | None = None


RESYNC_EVENT = JobEvent(type="resync")


FINISHED_EVENT = JobEvent(type="finished")


class JobListener:
    """One pub/sub subscription per gateway process to completions and job events, fanned out in memory.

    Two kinds of interest: `expect(id)` is a future resolved when the job finishes (for requests that wait
    for a result), `watch(id)` an asyncio queue of every JobEvent of the job (for event streams). Pub/sub
    delivers at most once, so after every (re)subscription the listener checks the stored results of the
    jobs it waits for, and tells every watcher to re-read its job's state: nothing is missed.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: RedisKeys,
        watch_queue_size: int = 256,
        on_completion: Callable[[], None] | None = None,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._on_completion = on_completion  # told of every completion in the cluster (throughput)
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._watchers: dict[str, set[asyncio.Queue[JobEvent]]] = {}
        self._watch_queue_size = watch_queue_size
        self.subscribed = asyncio.Event()

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

    async def run(self) -> None:
        """Listen until cancelled, resubscribing with backoff when Redis goes away."""
        backoff = 0.1
        while True:
            try:
                await self._listen()
            except (*UNAVAILABLE, OSError) as exc:
                self.subscribed.clear()
                logger.warning("job events subscription lost (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _listen(self) -> None:
        completions, events = self._keys.completions_channel, self._keys.job_events_channel
        async with self._redis.pubsub() as pubsub:
            await pubsub.subscribe(completions, events)
            self.subscribed.set()
            await self._resolve_finished()
            for job_id in list(self._watchers):
                self._tell(job_id, RESYNC_EVENT)
            async for message in pubsub.listen():
                if message["type"] != "message":
                    continue
                if text(message["channel"]) == completions:
                    if self._on_completion is not None:
                        self._on_completion()
                    job_id = text(message["data"])
                    self._resolve(job_id)
                    self._tell(job_id, FINISHED_EVENT)
                else:
                    self._on_job_event(message["data"])

    def _on_job_event(self, data: bytes) -> None:
        try:
            event = json.loads(data)
            job_id = event["id"]
            parsed = JobEvent(
                type=str(event["type"]), worker=event.get("worker"), step=event.get("step"), total=event.get("total")
            )
        except (ValueError, KeyError, TypeError):
            logger.warning("ignoring a malformed job event: %r", data[:200])
            return
        self._tell(str(job_id), parsed)

    def _tell(self, job_id: str, event: JobEvent) -> None:
        for events in self._watchers.get(job_id, ()):
            try:
                events.put_nowait(event)
            except asyncio.QueueFull:  # a stalled reader: it will re-read the state instead
                events.get_nowait()
                events.put_nowait(RESYNC_EVENT)

    async def _resolve_finished(self) -> None:
        job_ids = list(self._waiters)
        if not job_ids:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.exists(self._keys.result(job_id))
            found = await pipe.execute()
        for job_id, exists in zip(job_ids, found, strict=True):
            if exists:
                self._resolve(job_id)

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
