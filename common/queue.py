"""The job queue: a Redis stream read through one consumer group, results stored under the job id.

Submitting writes the job's record and its stream entry in one transaction. A worker claims one entry at
a time and, in one Lua script, stores the result (first result wins; a later duplicate is dropped and
counted), announces it on the completions channel, and only then acknowledges and deletes the entry.

Nothing is lost when a worker dies: an entry stays pending under its consumer until acknowledged, and an
idle worker takes over the pending entries of every consumer whose registry entry has expired (death is
decided by heartbeat, never by how long a job has run, so a slow worker keeps its job). The takeover is
one Lua script (XPENDING then XCLAIM), so two workers can never both take the same entry. An entry
delivered more than `max_deliveries` times goes to the dead-letter stream with its history, and its
requester gets a failed result.

A gateway learns of completions through one pub/sub subscription per process (`JobListener`), not
one connection per waiting request or event stream.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.exceptions import ResponseError

from common.protocol import JOB_ID_PATTERN, Job, JobResult
from common.redis_conn import UNAVAILABLE
from common.rediskeys import RedisKeys
from common.scripts import register

logger = logging.getLogger(__name__)


class MalformedJob(Exception):
    """A stream entry that is not a valid job. `job_id` is set when the entry named one."""

    def __init__(self, stream: str, entry_id: str, job_id: str | None, reason: str) -> None:
        super().__init__(f"stream {stream} entry {entry_id}: {reason}")
        self.stream = stream
        self.entry_id = entry_id
        self.job_id = job_id
        self.reason = reason


@dataclass(frozen=True)
class ClaimedJob:
    """A job delivered to this worker, with the stream entry that must be acknowledged."""

    job: Job
    stream: str
    entry_id: str
    enqueued_ms: int  # Redis server time when the job was added (from the entry id)
    deliveries: int = 1  # how many times the group has handed this entry out, this time included


class QueueFull(Exception):
    """The stream already holds its maximum of jobs; nothing was queued."""

    def __init__(self, stream: str, depth: int, max_depth: int) -> None:
        super().__init__(f"stream {stream} holds {depth} jobs (at most {max_depth})")
        self.stream = stream
        self.depth = depth
        self.max_depth = max_depth


class IdempotencyConflict(Exception):
    """An `Idempotency-Key` reused with a different request."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"the key was first used for job {job_id} with a different request")
        self.job_id = job_id


@dataclass(frozen=True)
class Submitted:
    """The job a submit refers to: the one it created, or the earlier one with the same idempotency key."""

    job_id: str
    created: bool


@dataclass(frozen=True)
class JobRecord:
    """A job's live state as stored: where it is, who runs it, how far it got."""

    status: str  # queued, running, succeeded, failed or cancelled
    job: Job | None
    entry_id: str | None
    stream: str | None = None
    worker: str | None = None
    step: int | None = None
    total: int | None = None

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes]) -> JobRecord:
        def get(name: str) -> str | None:
            value = fields.get(name.encode())
            return None if value is None else value.decode()

        raw_job, step, total = get("job"), get("step"), get("total")
        return cls(
            status=get("status") or "queued",
            job=Job.model_validate_json(raw_job) if raw_job else None,
            entry_id=get("entry"),
            stream=get("stream"),
            worker=get("worker"),
            step=None if step is None else int(step),
            total=None if total is None else int(total),
        )


@dataclass(frozen=True)
class StoredResult:
    """A finished job as read back: metadata and the encoded images in order."""

    result: JobResult
    images: list[bytes]


class JobQueue:
    """Submit, claim and complete jobs on one cluster's stream."""

    def __init__(self, redis: aioredis.Redis, keys: RedisKeys) -> None:
        self._redis = redis
        self._keys = keys
        self._store = register(redis, "store_result")
        self._submit = register(redis, "submit")
        self._start = register(redis, "start")
        self._progress = register(redis, "progress")
        self._cancel = register(redis, "cancel")
        self._take_over = register(redis, "take_over")
        self._move = register(redis, "move")
        self._held: collections.deque[tuple[str, str, dict[bytes, bytes]]] = collections.deque()

    async def ensure_group(self, stream: str) -> None:
        """Create a job stream and its consumer group if they do not exist yet, and list it (idempotent)."""
        try:
            await self._redis.xgroup_create(stream, self._keys.workers_group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        await self._redis.sadd(self._keys.job_streams, stream)

    async def streams(self) -> list[str]:
        """Every job stream in use."""
        members: set[bytes] = await self._redis.smembers(self._keys.job_streams)  # type: ignore[assignment]
        return sorted(_text(s) for s in members)

    async def depth(self) -> int:
        """Jobs queued or in service over all streams (entries are deleted when their result is stored)."""
        streams = await self.streams()
        if not streams:
            return 0
        async with self._redis.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xlen(stream)
            return sum(await pipe.execute())

    async def submit(
        self, job: Job, stream: str, idempotency_key: str | None = None, fingerprint: str = "", max_depth: int = 0
    ) -> Submitted:
        """Record and enqueue a job on `stream` atomically.

        With an idempotency key, only the first submit creates a job; a later one with the same key and
        `fingerprint` (a digest of the request) refers to that job, and one with another request raises
        IdempotencyConflict. The key lives as long as the job's result. With `max_depth`, a stream that
        already holds that many jobs takes no more: QueueFull (a replay of a key's job still succeeds).
        """
        keys = [self._keys.job(job.id), stream, self._keys.job_streams]
        if idempotency_key is not None:
            keys.append(self._keys.idempotency(idempotency_key))
        outcome, value = await self._submit(
            keys=keys, args=[job.model_dump_json(), job.result_ttl_s, job.id, fingerprint, max_depth]
        )
        if _text(outcome) == "full":
            raise QueueFull(stream, int(value), max_depth)
        job_id, _, first_fingerprint = _text(value).partition(" ")
        if first_fingerprint != fingerprint:
            raise IdempotencyConflict(job_id)
        return Submitted(job_id=job_id, created=_text(outcome) == "created")

    async def claim(self, consumer: str, streams: list[str], block_ms: int) -> ClaimedJob | None:
        """Take the next new job for `consumer` from `streams` (in order of preference), waiting up to
        `block_ms`; None if there was none.

        Each stream is first asked without waiting, one at a time, so a worker takes one job even when
        several streams have a backlog; only when all are empty does it wait on all of them. Should that
        wait deliver two entries at once (two streams written in the same instant), the second stays
        pending under this consumer and is returned by the next call: held, never lost.

        Raises MalformedJob for an entry that does not parse; the caller settles it with `reject`.
        """
        if self._held:
            return _parse_entry(*self._held.popleft())
        for stream in streams:
            if found := await self._read(consumer, {stream: ">"}, None):
                return _parse_entry(*found[0])
        found = await self._read(consumer, dict.fromkeys(streams, ">"), block_ms)
        if not found:
            return None
        self._held.extend(found[1:])
        return _parse_entry(*found[0])

    async def _read(
        self, consumer: str, streams: dict[str, str], block_ms: int | None
    ) -> list[tuple[str, str, dict[bytes, bytes]]]:
        try:
            reply: Any = await self._redis.xreadgroup(
                self._keys.workers_group,
                consumer,
                streams,  # type: ignore[arg-type]
                count=1,
                block=block_ms,
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # A stream vanished under us (Redis restarted without persistence, an operator's DEL): recreate
            # it with its group and read again; an error here is a real one.
            for stream in streams:
                await self.ensure_group(stream)
            reply = await self._redis.xreadgroup(
                self._keys.workers_group,
                consumer,
                streams,  # type: ignore[arg-type]
                count=1,
                block=block_ms,
            )
        return [
            (_text(stream), _text(entry_id), fields) for stream, entries in reply or () for entry_id, fields in entries
        ]

    async def start(self, claimed: ClaimedJob, worker_id: str) -> int | None:
        """Record that `worker_id` runs the job, append to its history, announce it.

        Returns the Redis server time in ms (the one clock that hosts share, for queue-wait figures), or
        None when the job was cancelled (or already finished) and must not run: settle it with `discard`.
        """
        job = claimed.job
        ms = int(
            await self._start(
                keys=[self._keys.job(job.id), self._keys.attempts(job.id), self._keys.result(job.id)],
                args=[worker_id, job.result_ttl_s, self._keys.job_events_channel, job.id],
            )
        )
        return None if ms < 0 else ms

    async def discard(self, claimed: ClaimedJob) -> None:
        """Acknowledge and drop an entry whose job must not run (cancelled while queued)."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xack(claimed.stream, self._keys.workers_group, claimed.entry_id)
            pipe.xdel(claimed.stream, claimed.entry_id)
            await pipe.execute()

    async def progress(self, job_id: str, worker_id: str, step: int, total: int) -> str | None:
        """Record and announce a finished denoising step; returns the job's status (None if unknown).

        Only the worker the job is recorded as running on reports; a status of `cancelled` tells the
        worker its result will be discarded.
        """
        status = await self._progress(
            keys=[self._keys.job(job_id)], args=[worker_id, step, total, self._keys.job_events_channel, job_id]
        )
        return None if status is None else _text(status)

    async def cancel(self, job_id: str) -> str | None:
        """Cancel a job unless it already finished.

        Returns None for an unknown job, `cancelled` if this call (or an earlier one) cancelled it, and the
        final status (`succeeded` or `failed`) of a job that finished first. A queued job never runs; a
        running one runs to the end and its result is dropped.
        """
        record = await self.record(job_id)
        if record is None:
            return None
        job = record.job
        meta = JobResult(
            id=job_id,
            status="cancelled",
            worker=record.worker,
            seed=job.seed if job else None,
            shape=job.shape if job else None,
        ).model_dump_json()
        ttl = job.result_ttl_s if job else 3600
        stream = record.stream or self._keys.shape_stream(job.shape if job else "unknown")
        outcome = await self._cancel(
            keys=[self._keys.job(job_id), self._keys.result(job_id), stream, self._keys.stats],
            args=[ttl, self._keys.completions_channel, job_id, meta],
        )
        if outcome is None:
            return None
        outcome = _text(outcome)
        return "cancelled" if outcome == "cancelled-now" else outcome

    async def record(self, job_id: str) -> JobRecord | None:
        """A job's stored state, or None for an unknown (or expired) job."""
        fields: dict[bytes, bytes] = await self._redis.hgetall(self._keys.job(job_id))  # type: ignore[assignment]
        return JobRecord.from_fields(fields) if fields else None

    async def positions(self, stream: str, entry_ids: list[str], limit: int = 1000) -> dict[str, int]:
        """How many undelivered jobs are ahead of each queued entry of `stream` (0: it is next).

        One XRANGE over the undelivered part of the stream, at most `limit` entries: positions beyond
        that are reported as `limit`.
        """
        if not entry_ids:
            return {}
        last = await self._last_delivered(stream)
        newest = max(entry_ids, key=_entry_key)
        ahead: list[tuple[int, int]] = []
        if _entry_key(newest) > _entry_key(last):
            entries: Any = await self._redis.xrange(stream, min=f"({last}", max=newest, count=limit)
            ahead = [_entry_key(_text(e[0])) for e in entries]
        return {entry: min(bisect.bisect_left(ahead, _entry_key(entry)), limit) for entry in entry_ids}

    async def _last_delivered(self, stream: str) -> str:
        try:
            groups = await self._redis.xinfo_groups(stream)
        except ResponseError:  # the stream is gone (a departed worker's, already emptied)
            return "0-0"
        for group in groups:
            if _text(group["name"]) == self._keys.workers_group:
                return _text(group["last-delivered-id"])
        return "0-0"

    async def reclaim(
        self, consumer: str, live: set[str], max_deliveries: int, streams: list[str]
    ) -> ClaimedJob | None:
        """Take over one job of `streams` from a consumer that is no longer alive (not in `live`), if any.

        Jobs delivered more than `max_deliveries` times are dead-lettered on the way, not returned.
        Raises MalformedJob for an unparseable entry, as `claim` does.
        """
        for stream in streams:
            claimed = await self._reclaim_from(stream, consumer, live, max_deliveries)
            if claimed is not None:
                return claimed
        return None

    async def _reclaim_from(self, stream: str, consumer: str, live: set[str], max_deliveries: int) -> ClaimedJob | None:
        for dead in await self._dead_consumers(stream, live | {consumer}):
            while taken := await self._take_over(
                keys=[stream, self._keys.stats], args=[self._keys.workers_group, dead, consumer]
            ):
                entry_id, deliveries, fields = _text(taken[0]), int(taken[1]), taken[2]
                if not fields:
                    continue
                claimed = _parse_entry(stream, entry_id, _pairs(fields), deliveries)
                logger.warning("took over job %s from dead worker %s (delivery %d)", claimed.job.id, dead, deliveries)
                if deliveries <= max_deliveries:
                    return claimed
                await self.dead_letter(
                    claimed,
                    consumer,
                    f"delivered {deliveries} times; every worker that took it stopped heartbeating before finishing",
                )
        return None

    async def _dead_consumers(self, stream: str, live: set[str]) -> list[str]:
        try:
            consumers = await self._redis.xinfo_consumers(stream, self._keys.workers_group)
        except ResponseError:  # no such stream or group yet: nobody to take over from
            return []
        return [name for c in consumers if (name := _text(c["name"])) not in live]

    async def rehome_orphans(self, live: set[str]) -> int:
        """Move every job left on the stream of a worker that is gone to the shared stream of its shape.

        Under `random` and `p2c` routing a job waits on its worker's own stream; when that worker dies or
        drains, what it had not finished (queued, or in service when it died) must go back to be served by
        the others. Returns how many jobs were moved.
        """
        moved = 0
        for stream in await self.streams():
            owner = self._keys.worker_of_stream(stream)
            if owner is not None and owner not in live:
                moved += await self.rehome(stream)
        return moved

    async def rehome(self, stream: str) -> int:
        """Move the jobs of one worker stream to their shape streams, then drop the emptied stream."""
        await self.ensure_group(stream)  # a submit racing the owner's exit may have recreated it bare
        moved = 0
        while entries := await self._entries(stream, 100):
            for entry_id, fields in entries:
                moved += await self._rehome_entry(stream, _text(entry_id), fields)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.srem(self._keys.job_streams, stream)
            pipe.delete(stream)
            await pipe.execute()
        if moved:
            logger.warning("moved %d job(s) of departed worker stream %s to the shared streams", moved, stream)
        return moved

    async def _entries(self, stream: str, count: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
        entries: Any = await self._redis.xrange(stream, count=count)
        return list(entries)

    async def _rehome_entry(self, stream: str, entry_id: str, fields: dict[bytes, bytes]) -> int:
        try:
            job = _parse_entry(stream, entry_id, fields).job
        except MalformedJob:
            await self._redis.xdel(stream, entry_id)
            return 0
        target = self._keys.shape_stream(job.shape)
        await self.ensure_group(target)
        moved = await self._move(
            keys=[stream, target, self._keys.job(job.id)], args=[self._keys.workers_group, entry_id]
        )
        return int(moved)

    async def dead_letter(self, claimed: ClaimedJob, worker_id: str, reason: str) -> None:
        """Give up on a job: record it with its history on the dead-letter stream and fail it."""
        job = claimed.job
        history = [_text(a) for a in await self._redis.lrange(self._keys.attempts(job.id), 0, -1)]
        result = JobResult(
            id=job.id,
            status="failed",
            worker=worker_id,
            seed=job.seed,
            shape=job.shape,
            error=f"gave up: {reason} (attempts: {', '.join(history) or 'none'})",
        )
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xadd(
                self._keys.dead_letter_stream,
                {
                    "job": job.model_dump_json(),
                    "entry_id": claimed.entry_id,
                    "deliveries": claimed.deliveries,
                    "attempts": json.dumps(history),
                    "reason": reason,
                },
            )
            pipe.hincrby(self._keys.stats, "dead_lettered", 1)
            await self._store(
                keys=self._store_keys(claimed.stream, job.id),
                client=pipe,
                args=self._store_args(claimed.entry_id, result, [], job.result_ttl_s),
            )
            await pipe.execute()
        logger.error("job %s dead-lettered: %s", job.id, reason)

    async def stats(self) -> dict[str, int]:
        """Cluster-wide counters: duplicate_results, reclaimed, dead_lettered."""
        raw: dict[bytes, bytes] = await self._redis.hgetall(self._keys.stats)  # type: ignore[assignment]
        return {_text(k): int(v) for k, v in raw.items()}

    async def complete(self, claimed: ClaimedJob, result: JobResult, images: list[bytes]) -> bool:
        """Store a result (first one wins), announce it, then acknowledge the entry.

        Returns False when a result for this job was already stored; this one was dropped.
        """
        return await self._store_and_ack(claimed.stream, claimed.entry_id, result, images, claimed.job.result_ttl_s)

    async def reject(self, malformed: MalformedJob, worker_id: str, ttl_s: int) -> None:
        """Settle an unparseable entry: fail its job if it named one, and acknowledge it."""
        if malformed.job_id is not None:
            result = JobResult(
                id=malformed.job_id, status="failed", worker=worker_id, error=f"invalid job: {malformed.reason}"
            )
            await self._store_and_ack(malformed.stream, malformed.entry_id, result, [], ttl_s)
            return
        await self._redis.xack(malformed.stream, self._keys.workers_group, malformed.entry_id)
        await self._redis.xdel(malformed.stream, malformed.entry_id)

    async def _store_and_ack(
        self, stream: str, entry_id: str, result: JobResult, images: list[bytes], ttl_s: int
    ) -> bool:
        stored = await self._store(
            keys=self._store_keys(stream, result.id), args=self._store_args(entry_id, result, images, ttl_s)
        )
        return bool(stored)

    def _store_keys(self, stream: str, job_id: str) -> list[str]:
        return [self._keys.result(job_id), stream, self._keys.job(job_id), self._keys.stats]

    def _store_args(self, entry_id: str, result: JobResult, images: list[bytes], ttl_s: int) -> list[Any]:
        return [
            self._keys.workers_group,
            entry_id,
            ttl_s,
            self._keys.completions_channel,
            result.id,
            result.model_dump_json(),
            result.status,
            *images,
        ]

    async def fetch_result(self, job_id: str) -> StoredResult | None:
        """The stored result of a job, or None if it has not finished (or has expired)."""
        fields: dict[bytes, bytes] = await self._redis.hgetall(self._keys.result(job_id))  # type: ignore[assignment]
        if not fields:
            return None
        result = JobResult.model_validate_json(fields[b"meta"])
        images = [fields[f"image:{k}".encode()] for k in range(result.image_count)]
        return StoredResult(result=result, images=images)

    async def fetch_meta(self, job_id: str) -> JobResult | None:
        """A finished job's result metadata without its images; None if it has not finished."""
        meta = await self._redis.hget(self._keys.result(job_id), "meta")
        return None if meta is None else JobResult.model_validate_json(meta)

    async def fetch_image(self, job_id: str, index: int) -> tuple[JobResult, bytes | None] | None:
        """One image of a finished job with its result metadata; None if the job has no stored result."""
        fields: list[Any] = await self._redis.hmget(self._keys.result(job_id), ["meta", f"image:{index}"])
        meta, image = fields
        if meta is None:
            return None
        return JobResult.model_validate_json(meta), image

    async def job_status(self, job_id: str) -> str | None:
        """`queued`, `running`, `succeeded`, `failed` or `cancelled` while the job's record lives; None for an
        unknown id."""
        status = await self._redis.hget(self._keys.job(job_id), "status")
        return None if status is None else _text(status)


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
                if _text(message["channel"]) == completions:
                    if self._on_completion is not None:
                        self._on_completion()
                    job_id = _text(message["data"])
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


def _parse_entry(stream: str, entry_id: str, fields: dict[bytes, bytes], deliveries: int = 1) -> ClaimedJob:
    raw = fields.get(b"job")
    if raw is None:
        raise MalformedJob(stream, entry_id, None, "no 'job' field")
    try:
        job = Job.model_validate_json(raw)
    except ValidationError as exc:
        raise MalformedJob(stream, entry_id, _job_id_of(raw), _first_error(exc)) from exc
    # A job moved off a departed worker's stream carries the deliveries it had there.
    try:
        earlier = int(fields.get(b"deliveries", b"0"))
        enqueued = int(fields.get(b"enqueued", entry_id.split("-", 1)[0]))
    except ValueError:
        raise MalformedJob(stream, entry_id, job.id, "deliveries and enqueued must be integers") from None
    return ClaimedJob(job=job, stream=stream, entry_id=entry_id, enqueued_ms=enqueued, deliveries=deliveries + earlier)


def _pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    """A stream entry's fields as Lua returns them, [k1, v1, k2, v2, ...], as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _job_id_of(raw: bytes) -> str | None:
    """The id of a job that failed validation, if it had a usable one."""
    with contextlib.suppress(ValueError, UnicodeDecodeError):
        data: Any = json.loads(raw)
        job_id = data.get("id") if isinstance(data, dict) else None
        if isinstance(job_id, str) and re.fullmatch(JOB_ID_PATTERN, job_id):
            return job_id
    return None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "job"
    return f"{where}: {err['msg']}"


def _entry_key(entry_id: str) -> tuple[int, int]:
    """A stream entry id as a sortable (milliseconds, sequence) pair."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
