"""The job queue: a Redis stream read through one consumer group, results stored under the job id.

Submitting writes the job's record and its stream entry in one transaction. A worker claims one entry at
a time and, in one Lua script, stores the result (first result wins), announces it on the completions
channel, and only then acknowledges and deletes the entry. A gateway learns of completions through one
pub/sub subscription per process (`CompletionListener`), not one connection per waiting request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from common.keys import Keys
from common.protocol import Job, JobResult

logger = logging.getLogger(__name__)

# KEYS: result, stream, job record.  ARGV: group, entry id, ttl, channel, job id, meta, image bytes...
_STORE_RESULT = """
local stored = 0
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'meta', ARGV[6])
  for i = 7, #ARGV do
    redis.call('HSET', KEYS[1], 'image:' .. (i - 7), ARGV[i])
  end
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  redis.call('HSET', KEYS[3], 'status', 'done')
  redis.call('EXPIRE', KEYS[3], ARGV[3])
  redis.call('PUBLISH', ARGV[4], ARGV[5])
  stored = 1
end
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
return stored
"""


class MalformedJob(Exception):
    """A stream entry that is not a valid job. `job_id` is set when the entry named one."""

    def __init__(self, entry_id: str, job_id: str | None, reason: str) -> None:
        super().__init__(f"stream entry {entry_id}: {reason}")
        self.entry_id = entry_id
        self.job_id = job_id
        self.reason = reason


@dataclass(frozen=True)
class ClaimedJob:
    """A job delivered to this worker, with the stream entry that must be acknowledged."""

    job: Job
    entry_id: str
    enqueued_ms: int  # Redis server time when the job was added (from the entry id)


@dataclass(frozen=True)
class StoredResult:
    """A finished job as read back: metadata and the encoded images in order."""

    result: JobResult
    images: list[bytes]


class JobQueue:
    """Submit, claim and complete jobs on one cluster's stream."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys
        self._store = redis.register_script(_STORE_RESULT)

    async def ensure_group(self) -> None:
        """Create the stream and its consumer group if they do not exist yet (idempotent)."""
        try:
            await self._redis.xgroup_create(self._keys.jobs_stream, self._keys.workers_group, id="0",
                                            mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def submit(self, job: Job) -> str:
        """Record and enqueue a job atomically; returns its stream entry id."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._keys.job(job.id), mapping={"job": job.model_dump_json(), "status": "queued"})
            pipe.expire(self._keys.job(job.id), job.result_ttl_s)
            pipe.xadd(self._keys.jobs_stream, {"job": job.model_dump_json()})
            _, _, entry_id = await pipe.execute()
        return _text(entry_id)

    async def claim(self, consumer: str, block_ms: int) -> ClaimedJob | None:
        """Take the next new job for `consumer`, waiting up to `block_ms`; None if there was none.

        Raises MalformedJob for an entry that does not parse; the caller settles it with `reject`.
        """
        reply: Any = await self._redis.xreadgroup(self._keys.workers_group, consumer, {self._keys.jobs_stream: ">"},
                                             count=1, block=block_ms)
        if not reply:
            return None
        _stream, entries = reply[0]
        entry_id, fields = entries[0]
        return _parse_entry(_text(entry_id), fields)

    async def mark_running(self, job_id: str, worker_id: str) -> None:
        """Record which worker is running a job (for status queries)."""
        await self._redis.hset(self._keys.job(job_id), mapping={"status": "running", "worker": worker_id})

    async def server_time_ms(self) -> int:
        """Redis server time, the one clock that gateways and workers on different hosts share."""
        seconds, micros = await self._redis.time()
        return int(seconds) * 1000 + int(micros) // 1000

    async def complete(self, claimed: ClaimedJob, result: JobResult, images: list[bytes]) -> bool:
        """Store a result (first one wins), announce it, then acknowledge the entry.

        Returns False when a result for this job was already stored; this one was dropped.
        """
        return await self._store_and_ack(claimed.entry_id, result, images, claimed.job.result_ttl_s)

    async def reject(self, malformed: MalformedJob, worker_id: str, ttl_s: int) -> None:
        """Settle an unparseable entry: fail its job if it named one, and acknowledge it."""
        if malformed.job_id is not None:
            result = JobResult(id=malformed.job_id, status="failed", worker=worker_id,
                               error=f"invalid job: {malformed.reason}")
            await self._store_and_ack(malformed.entry_id, result, [], ttl_s)
            return
        await self._redis.xack(self._keys.jobs_stream, self._keys.workers_group, malformed.entry_id)
        await self._redis.xdel(self._keys.jobs_stream, malformed.entry_id)

    async def _store_and_ack(self, entry_id: str, result: JobResult, images: list[bytes], ttl_s: int) -> bool:
        stored = await self._store(
            keys=[self._keys.result(result.id), self._keys.jobs_stream, self._keys.job(result.id)],
            args=[self._keys.workers_group, entry_id, ttl_s, self._keys.completions_channel, result.id,
                  result.model_dump_json(), *images],
        )
        return bool(stored)

    async def fetch_result(self, job_id: str) -> StoredResult | None:
        """The stored result of a job, or None if it has not finished (or has expired)."""
        fields: dict[bytes, bytes] = await self._redis.hgetall(self._keys.result(job_id))  # type: ignore[assignment]
        if not fields:
            return None
        result = JobResult.model_validate_json(fields[b"meta"])
        images = [fields[f"image:{k}".encode()] for k in range(result.image_count)]
        return StoredResult(result=result, images=images)

    async def job_status(self, job_id: str) -> str | None:
        """`queued`, `running` or `done` while the job's record lives; None for an unknown id."""
        status = await self._redis.hget(self._keys.job(job_id), "status")
        return None if status is None else _text(status)


class CompletionListener:
    """One subscription to the completions channel per gateway process, waking the waiting requests.

    Pub/sub delivers at most once, so after every (re)subscription the listener checks the stored
    results of everything still waiting: a completion announced while it was disconnected is not missed.
    """

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self.subscribed = asyncio.Event()

    def expect(self, job_id: str) -> asyncio.Future[None]:
        """Register interest in a job before submitting it; the future resolves when it finishes."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job_id, set()).add(future)
        return future

    def forget(self, job_id: str, future: asyncio.Future[None]) -> None:
        """Drop a waiter (finished, timed out or cancelled)."""
        waiters = self._waiters.get(job_id)
        if waiters is not None:
            waiters.discard(future)
            if not waiters:
                del self._waiters[job_id]

    @property
    def waiting(self) -> int:
        """How many requests are waiting for a result."""
        return sum(len(w) for w in self._waiters.values())

    async def run(self) -> None:
        """Listen until cancelled, resubscribing with backoff when Redis goes away."""
        backoff = 0.1
        while True:
            try:
                await self._listen()
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                self.subscribed.clear()
                logger.warning("completions subscription lost (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _listen(self) -> None:
        async with self._redis.pubsub() as pubsub:
            await pubsub.subscribe(self._keys.completions_channel)
            self.subscribed.set()
            await self._resolve_finished()
            async for message in pubsub.listen():
                if message["type"] == "message":
                    self._resolve(_text(message["data"]))

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


def _parse_entry(entry_id: str, fields: dict[bytes, bytes]) -> ClaimedJob:
    raw = fields.get(b"job")
    if raw is None:
        raise MalformedJob(entry_id, None, "no 'job' field")
    try:
        job = Job.model_validate_json(raw)
    except ValidationError as exc:
        raise MalformedJob(entry_id, _job_id_of(raw), _first_error(exc)) from exc
    return ClaimedJob(job=job, entry_id=entry_id, enqueued_ms=int(entry_id.split("-", 1)[0]))


def _job_id_of(raw: bytes) -> str | None:
    """The id of a job that failed validation, if it had a usable one."""
    with contextlib.suppress(ValueError, UnicodeDecodeError):
        data: Any = json.loads(raw)
        job_id = data.get("id") if isinstance(data, dict) else None
        if isinstance(job_id, str) and 0 < len(job_id) <= 64:
            return job_id
    return None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "job"
    return f"{where}: {err['msg']}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
