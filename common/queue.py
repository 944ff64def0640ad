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

A gateway learns of completions through one pub/sub subscription per process (`CompletionListener`), not
one connection per waiting request.
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
from redis.exceptions import ResponseError

from common.keys import Keys
from common.protocol import Job, JobResult
from common.redis_conn import UNAVAILABLE

logger = logging.getLogger(__name__)

# KEYS: result, stream, job record, stats.  ARGV: group, entry id, ttl, channel, job id, meta, images...
_STORE_RESULT = """
local stored = 0
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HINCRBY', KEYS[4], 'duplicate_results', 1)
else
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

# KEYS: job record, attempts.  ARGV: worker, ttl, job events channel, job id.  Returns Redis time (ms).
_START = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('RPUSH', KEYS[2], ARGV[1] .. '@' .. ms)
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('PUBLISH', ARGV[3], cjson.encode({id = ARGV[4], type = 'started', worker = ARGV[1]}))
return ms
"""

# Take the oldest pending entry of a dead consumer, or forget the consumer once it holds none.
# KEYS: stream, stats.  ARGV: group, dead consumer, new consumer.
# Returns false (nothing left), or {entry id, deliveries, fields or false if the entry was deleted}.
_TAKE_OVER = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #pending == 0 then
  redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
  return false
end
local id = pending[1][1]
local deliveries = pending[1][4] + 1
local entries = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, id)
redis.call('HINCRBY', KEYS[2], 'reclaimed', 1)
if #entries == 0 or not entries[1][2] then
  redis.call('XACK', KEYS[1], ARGV[1], id)
  return {id, deliveries, false}
end
return {id, deliveries, entries[1][2]}
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
    deliveries: int = 1  # how many times the group has handed this entry out, this time included


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
        self._start = redis.register_script(_START)
        self._take_over = redis.register_script(_TAKE_OVER)

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

    async def start(self, claimed: ClaimedJob, worker_id: str) -> int:
        """Record that `worker_id` runs the job, append to its history, announce it.

        Returns the Redis server time in ms: the one clock that hosts share, for queue-wait figures.
        """
        job = claimed.job
        ms = await self._start(keys=[self._keys.job(job.id), self._keys.attempts(job.id)],
                               args=[worker_id, job.result_ttl_s, self._keys.job_events_channel, job.id])
        return int(ms)

    async def reclaim(self, consumer: str, live: set[str], max_deliveries: int) -> ClaimedJob | None:
        """Take over one job from a consumer that is no longer alive (not in `live`), if there is one.

        Jobs delivered more than `max_deliveries` times are dead-lettered on the way, not returned.
        Raises MalformedJob for an unparseable entry, as `claim` does.
        """
        for dead in await self._dead_consumers(live | {consumer}):
            while (taken := await self._take_over(keys=[self._keys.jobs_stream, self._keys.stats],
                                                  args=[self._keys.workers_group, dead, consumer])):
                entry_id, deliveries, fields = _text(taken[0]), int(taken[1]), taken[2]
                if not fields:
                    continue
                claimed = _parse_entry(entry_id, _pairs(fields), deliveries)
                logger.warning("took over job %s from dead worker %s (delivery %d)", claimed.job.id, dead,
                               deliveries)
                if deliveries <= max_deliveries:
                    return claimed
                await self.dead_letter(claimed, consumer, f"delivered {deliveries} times; every worker "
                                       "that took it stopped heartbeating before finishing")
        return None

    async def _dead_consumers(self, live: set[str]) -> list[str]:
        consumers = await self._redis.xinfo_consumers(self._keys.jobs_stream, self._keys.workers_group)
        return [name for c in consumers if (name := _text(c["name"])) not in live]

    async def dead_letter(self, claimed: ClaimedJob, worker_id: str, reason: str) -> None:
        """Give up on a job: record it with its history on the dead-letter stream and fail it."""
        job = claimed.job
        history = [_text(a) for a in await self._redis.lrange(self._keys.attempts(job.id), 0, -1)]
        result = JobResult(id=job.id, status="failed", worker=worker_id, seed=job.seed, shape=job.shape,
                           error=f"gave up: {reason} (attempts: {', '.join(history) or 'none'})")
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self._keys.dead_letter_stream, {
                "job": job.model_dump_json(), "entry_id": claimed.entry_id, "deliveries": claimed.deliveries,
                "attempts": json.dumps(history), "reason": reason})
            pipe.hincrby(self._keys.stats, "dead_lettered", 1)
            await self._store(keys=self._store_keys(job.id), client=pipe, args=self._store_args(
                claimed.entry_id, result, [], job.result_ttl_s))
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
        stored = await self._store(keys=self._store_keys(result.id),
                                   args=self._store_args(entry_id, result, images, ttl_s))
        return bool(stored)

    def _store_keys(self, job_id: str) -> list[str]:
        return [self._keys.result(job_id), self._keys.jobs_stream, self._keys.job(job_id), self._keys.stats]

    def _store_args(self, entry_id: str, result: JobResult, images: list[bytes], ttl_s: int) -> list[Any]:
        return [self._keys.workers_group, entry_id, ttl_s, self._keys.completions_channel, result.id,
                result.model_dump_json(), *images]

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
            except (*UNAVAILABLE, OSError) as exc:
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


def _parse_entry(entry_id: str, fields: dict[bytes, bytes], deliveries: int = 1) -> ClaimedJob:
    raw = fields.get(b"job")
    if raw is None:
        raise MalformedJob(entry_id, None, "no 'job' field")
    try:
        job = Job.model_validate_json(raw)
    except ValidationError as exc:
        raise MalformedJob(entry_id, _job_id_of(raw), _first_error(exc)) from exc
    return ClaimedJob(job=job, entry_id=entry_id, enqueued_ms=int(entry_id.split("-", 1)[0]), deliveries=deliveries)


def _pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    """A stream entry's fields as Lua returns them, [k1, v1, k2, v2, ...], as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


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
