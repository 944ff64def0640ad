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

from common.keys import Keys
from common.protocol import JOB_ID_PATTERN, Job, JobResult
from common.redis_conn import UNAVAILABLE

logger = logging.getLogger(__name__)

# A job's record outlives its images by this factor, so a result arriving after they expired is still
# refused: the record says the job is terminal.
RECORD_TTL_FACTOR = 2
# The lifetime of a failure stored for an entry whose job could not be read.
DEFAULT_RESULT_TTL_S = 3600
# A departed worker's stream is emptied and dropped in at most this many passes per call (a submit racing
# the drop starts another); what is left waits for the next reclaim round.
REHOME_ROUNDS = 10
# The listener checks the results of the requests it waits for this often, whatever pub/sub said, and is
# unhealthy when its connection has not been read for STALL_FACTOR times as long.
SWEEP_INTERVAL_S = 2.0
STALL_FACTOR = 3
BACKOFF_FIRST_S = 0.1
BACKOFF_CAP_S = 5.0

# Every script below may run twice: redis-py retries a call whose reply was lost (a dropped connection, a
# timeout), so a second run must answer as the first did and change nothing more (docs/delivery.md).

# A job is terminal once its record says succeeded, failed or cancelled; from then on its record and
# idempotency key expire (the record outlives the images, so a late result is still refused), and no other
# result is stored. `settled` names the attempt whose result it was, so a rerun of that store says stored.
_TERMINAL = "local function terminal(s) return s == 'succeeded' or s == 'failed' or s == 'cancelled' end\n"

# Make the job terminal: its result, the record's status, lifetimes counted from now, the announcement.
# Uses KEYS[1] result, KEYS[3] record, KEYS[5] attempts; ARGV[3] result ttl, ARGV[4] record ttl, ARGV[5]
# completions channel, ARGV[6] job id.
_FINISH = """
local function finish(status, settled, meta, first_image)
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'meta', meta)
  for i = first_image, #ARGV do
    redis.call('HSET', KEYS[1], 'image:' .. (i - first_image), ARGV[i])
  end
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  redis.call('HSET', KEYS[3], 'status', status, 'settled', settled)
  redis.call('EXPIRE', KEYS[3], ARGV[4])
  local key = redis.call('HGET', KEYS[3], 'idempotency')
  if key then redis.call('EXPIRE', key, ARGV[3]) end
  redis.call('EXPIRE', KEYS[5], ARGV[4])
  redis.call('PUBLISH', ARGV[5], ARGV[6])
end
"""

# Store a result unless the job is terminal or another attempt holds it (fencing), announce it, then
# acknowledge and delete the entry. A record without a token was never started: any delivery may store.
# A missing record is one that expired after the job finished (refused), unless the job is younger than a
# record's lifetime: then Redis lost it (restored from an older snapshot) and the result is stored.
# KEYS: result, stream, job record, stats, attempts.
# ARGV: group, entry id, result ttl, record ttl, channel, job id, meta, status, attempt token ('': not
# fenced, for an entry that does not parse), enqueued (Redis ms), images...
# Returns 'stored' (this attempt's result is the job's, now or by an earlier run), 'duplicate' (the job
# was already terminal) or 'stale' (another attempt holds the job; its entry is left to it).
_STORE_RESULT = (
    _TERMINAL
    + _FINISH
    + """
local function settle()
  redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
  redis.call('XDEL', KEYS[2], ARGV[2])
end
local status = redis.call('HGET', KEYS[3], 'status')
local fenced = ARGV[9] ~= ''
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local expired = now_ms - tonumber(ARGV[10]) > tonumber(ARGV[4]) * 1000
if terminal(status) or (fenced and not status and expired) then
  settle()
  if status and redis.call('HGET', KEYS[3], 'settled') == ARGV[9] then return 'stored' end
  local counter = 'duplicate_results'
  if status == 'cancelled' then counter = 'discarded_after_cancel' end
  redis.call('HINCRBY', KEYS[4], counter, 1)
  return 'duplicate'
end
local holder = redis.call('HGET', KEYS[3], 'token')
if fenced and holder and holder ~= ARGV[9] then
  redis.call('HINCRBY', KEYS[4], 'stale_results', 1)
  return 'stale'
end
finish(ARGV[8], ARGV[9], ARGV[7], 11)
settle()
return 'stored'
"""
)

# Submit: the job's record and its stream entry together; with an idempotency key, at most one job per key;
# with a maximum depth, nothing is queued on a stream already holding that many entries (queued or in
# service), checked in the same script so that any number of gateways cannot overshoot it. A replay of a
# key's job is answered before the depth is looked at: it queues nothing. The job id is drawn before the
# call, so a rerun finds this job's record and answers `created` again without queueing it twice. Neither
# the record nor the key expires while the job is not terminal.
# KEYS: job record, stream, set of job streams[, idempotency key].  ARGV: job json, job id, fingerprint,
# max depth (0: none).
# Returns {'created', "job-id fingerprint"}, {'existing', "job-id fingerprint" of the key's job} or
# {'full', depth}.
_SUBMIT = """
local claim = ARGV[2] .. ' ' .. ARGV[3]
if redis.call('EXISTS', KEYS[1]) == 1 then return {'created', claim} end
if KEYS[4] then
  local existing = redis.call('GET', KEYS[4])
  if existing then return {'existing', existing} end
end
local max_depth = tonumber(ARGV[4])
if max_depth > 0 then
  local depth = redis.call('XLEN', KEYS[2])
  if depth >= max_depth then return {'full', depth} end
end
local entry = redis.call('XADD', KEYS[2], '*', 'job', ARGV[1])
redis.call('SADD', KEYS[3], KEYS[2])
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('HSET', KEYS[1], 'job', ARGV[1], 'status', 'queued', 'entry', entry, 'stream', KEYS[2], 'created', ms)
if KEYS[4] then
  redis.call('SET', KEYS[4], claim)
  redis.call('HSET', KEYS[1], 'idempotency', KEYS[4])
end
return {'created', claim}
"""

# Start an attempt: the delivery's token (stream, entry, delivery count) becomes the job's current attempt,
# the one whose result will be accepted. A rerun with the same token returns the same start time.
# KEYS: job record, attempts.  ARGV: worker, job events channel, job id, attempt token.
# Returns Redis time (ms), or -1 when the job is terminal (cancelled, or finished by another attempt).
_START = (
    _TERMINAL
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if terminal(status) then return -1 end
if status == 'running' and redis.call('HGET', KEYS[1], 'token') == ARGV[4] then
  return tonumber(redis.call('HGET', KEYS[1], 'started'))
end
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1], 'token', ARGV[4], 'started', ms)
redis.call('HDEL', KEYS[1], 'step', 'total')
redis.call('RPUSH', KEYS[2], ARGV[1] .. '@' .. ms)
redis.call('PUBLISH', ARGV[2], cjson.encode({id = ARGV[3], type = 'started', worker = ARGV[1]}))
return ms
"""
)

# Record a finished denoising step, if `worker` still owns the running job; returns the job's status.
# KEYS: job record.  ARGV: worker, step, total, job events channel, job id.
_PROGRESS = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'running' and redis.call('HGET', KEYS[1], 'worker') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'step', ARGV[2], 'total', ARGV[3])
  redis.call('PUBLISH', ARGV[4], cjson.encode({id = ARGV[5], type = 'progress',
                                               step = tonumber(ARGV[2]), total = tonumber(ARGV[3])}))
end
return status or false
"""

# Cancel a job that is not terminal: make it terminal as `cancelled` (so a worker's later result is
# refused), take its entry off the stream (a queued job is never delivered) and announce it.
# KEYS: result, stream, job record, stats, attempts.  ARGV: (unused), (unused), result ttl, record ttl,
# completions channel, job id, meta.
# Returns false for an unknown job, 'cancelled-now', or the status of a job already terminal.
_CANCEL = (
    _TERMINAL
    + _FINISH
    + """
local status = redis.call('HGET', KEYS[3], 'status')
if not status then return false end
if terminal(status) then return status end
local entry = redis.call('HGET', KEYS[3], 'entry')
if entry then redis.call('XDEL', KEYS[2], entry) end
finish('cancelled', 'cancelled', ARGV[7], #ARGV + 1)
redis.call('HINCRBY', KEYS[4], 'cancelled', 1)
return 'cancelled-now'
"""
)

# Give up on a job: record it with its history on the dead-letter stream and make it terminal as failed,
# then acknowledge its entry; a rerun (or a job already terminal) only acknowledges.
# KEYS: result, stream, job record, stats, attempts, dead-letter stream.
# ARGV: group, entry id, result ttl, record ttl, channel, job id, meta, job json, deliveries, reason.
# Returns 1 when this call dead-lettered the job.
_DEAD_LETTER = (
    _TERMINAL
    + _FINISH
    + """
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
if terminal(redis.call('HGET', KEYS[3], 'status')) then return 0 end
local history = redis.call('LRANGE', KEYS[5], 0, -1)
local attempts = '[]'
if #history > 0 then attempts = cjson.encode(history) end
redis.call('XADD', KEYS[6], '*', 'job', ARGV[8], 'entry_id', ARGV[2], 'deliveries', ARGV[9],
           'attempts', attempts, 'reason', ARGV[10])
redis.call('HINCRBY', KEYS[4], 'dead_lettered', 1)
finish('failed', 'dead-letter', ARGV[7], #ARGV + 1)
return 1
"""
)

# Claim for one consumer without waiting: first an entry already pending under it (its reply was lost, a
# take-over's reply was lost, Redis came back from an older snapshot: it would otherwise stay pending under
# a live worker for ever), then a new entry, each stream in order of preference. Reading the consumer's
# own pending entries again counts as a delivery. An own pending entry that was deleted (a cancelled job)
# is acknowledged on the way.
# KEYS: the streams.  ARGV: group, consumer.
# Returns false, or {stream, entry id, fields, deliveries by this stream's group}.
_CLAIM = """
for i = 1, #KEYS do
  while true do
    local reply = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1, 'STREAMS', KEYS[i], '0')
    local entry = reply and reply[1] and reply[1][2][1]
    if not entry then break end
    if entry[2] then
      local pending = redis.call('XPENDING', KEYS[i], ARGV[1], entry[1], entry[1], 1)
      return {KEYS[i], entry[1], entry[2], pending[1][4]}
    end
    redis.call('XACK', KEYS[i], ARGV[1], entry[1])
  end
end
for i = 1, #KEYS do
  local reply = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1, 'STREAMS', KEYS[i], '>')
  if reply then
    local entry = reply[1][2][1]
    return {KEYS[i], entry[1], entry[2], 1}
  end
end
return false
"""

# Drop a departed worker's stream once it holds no entry, in the same step as the check, so that a job
# submitted to it meanwhile is never deleted with it. KEYS: stream, set of job streams. Returns 1 if dropped.
_DROP_IF_EMPTY = """
if redis.call('XLEN', KEYS[1]) > 0 then return 0 end
redis.call('SREM', KEYS[2], KEYS[1])
redis.call('DEL', KEYS[1])
return 1
"""

# Move one entry of a departed worker's stream to the shared stream of its shape, keeping its enqueue
# time and counting a delivery if it was in service; skip a cancelled or finished job.
# KEYS: from stream, to stream, job record.  ARGV: group, entry id.  Returns 1 if moved.
_MOVE = """
local entries = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
if #entries == 0 then return 0 end
local fields = entries[1][2]
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
local status = redis.call('HGET', KEYS[3], 'status')
if status ~= 'queued' and status ~= 'running' then return 0 end
local out = {}
local deliveries, enqueued = 0, string.match(ARGV[2], '^(%d+)')
for i = 1, #fields, 2 do
  if fields[i] == 'deliveries' then deliveries = tonumber(fields[i + 1])
  elseif fields[i] == 'enqueued' then enqueued = fields[i + 1]
  else table.insert(out, fields[i]); table.insert(out, fields[i + 1]) end
end
if #pending > 0 then deliveries = deliveries + pending[1][4] end
table.insert(out, 'deliveries'); table.insert(out, tostring(deliveries))
table.insert(out, 'enqueued'); table.insert(out, enqueued)
local entry = redis.call('XADD', KEYS[2], '*', unpack(out))
redis.call('HSET', KEYS[3], 'status', 'queued', 'entry', entry, 'stream', KEYS[2])
return 1
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
    deliveries: int = 1  # how many times the job was handed out, on every stream it was on, this time included

    @property
    def token(self) -> str:
        """This delivery's attempt token: unique per delivery of a job, the same when a call is retried."""
        return f"{self.stream} {self.entry_id} {self.deliveries}"


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

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys
        self._store = redis.register_script(_STORE_RESULT)
        self._submit = redis.register_script(_SUBMIT)
        self._start = redis.register_script(_START)
        self._progress = redis.register_script(_PROGRESS)
        self._cancel = redis.register_script(_CANCEL)
        self._take_over = redis.register_script(_TAKE_OVER)
        self._move = redis.register_script(_MOVE)
        self._claim = redis.register_script(_CLAIM)
        self._drop_if_empty = redis.register_script(_DROP_IF_EMPTY)
        self._dead_letter = redis.register_script(_DEAD_LETTER)
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
        Safe to run twice: a rerun for the same job answers as the first run did and queues nothing more.
        """
        keys = [self._keys.job(job.id), stream, self._keys.job_streams]
        if idempotency_key is not None:
            keys.append(self._keys.idempotency(idempotency_key))
        outcome, value = await self._submit(keys=keys, args=[job.model_dump_json(), job.id, fingerprint, max_depth])
        if _text(outcome) == "full":
            raise QueueFull(stream, int(value), max_depth)
        job_id, _, first_fingerprint = _text(value).partition(" ")
        if first_fingerprint != fingerprint:
            raise IdempotencyConflict(job_id)
        return Submitted(job_id=job_id, created=_text(outcome) == "created")

    async def claim(self, consumer: str, streams: list[str], block_ms: int) -> ClaimedJob | None:
        """Take the next job for `consumer` from `streams` (in order of preference), waiting up to
        `block_ms`; None if there was none.

        One script first takes an entry already pending under `consumer` that it is not working on (the
        reply that delivered it was lost, or Redis came back from an older snapshot), then a new entry from
        the first stream that has one, so a worker takes one job even when several streams have a backlog;
        only when all are empty does it wait on all of them. Should that wait deliver two entries at once
        (two streams written in the same instant), the second stays pending under this consumer and is
        returned by the next call: held, never lost. Call it only with no job in hand.

        Raises MalformedJob for an entry that does not parse; the caller settles it with `reject`.
        """
        if self._held:
            return _parse_entry(*self._held.popleft())
        if now := await self._claim_now(consumer, streams):
            return now
        found = await self._read(consumer, dict.fromkeys(streams, ">"), block_ms)
        if not found:
            return None
        self._held.extend(found[1:])
        return _parse_entry(*found[0])

    async def _claim_now(self, consumer: str, streams: list[str]) -> ClaimedJob | None:
        try:
            reply: Any = await self._claim(keys=streams, args=[self._keys.workers_group, consumer])
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            for stream in streams:  # a stream vanished under us: recreate it, as `_read` does
                await self.ensure_group(stream)
            reply = await self._claim(keys=streams, args=[self._keys.workers_group, consumer])
        if not reply:
            return None
        stream, entry_id, fields, deliveries = reply
        return _parse_entry(_text(stream), _text(entry_id), _pairs(fields), int(deliveries))

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
        """Make this delivery the job's current attempt: record that `worker_id` runs it, append to its
        history, announce it. From then on only this delivery's result is accepted (`complete`).

        Returns the Redis server time in ms (the one clock that hosts share, for queue-wait figures), or
        None when the job is terminal (cancelled, or finished by another attempt) and must not run: settle
        it with `discard`. Safe to run twice: a rerun for the same delivery returns the same time.
        """
        job = claimed.job
        ms = int(
            await self._start(
                keys=[self._keys.job(job.id), self._keys.attempts(job.id)],
                args=[worker_id, self._keys.job_events_channel, job.id, claimed.token],
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
        ttl = job.result_ttl_s if job else DEFAULT_RESULT_TTL_S
        stream = record.stream or self._keys.shape_stream(job.shape if job else "unknown")
        outcome = await self._cancel(
            keys=self._terminal_keys(stream, job_id),
            args=["", "", *self._terminal_args(job_id, ttl), meta],
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
                logger.warning(
                    "took over job %s from dead worker %s (delivery %d)", claimed.job.id, dead, claimed.deliveries
                )
                if not await self.dead_letter_if_exhausted(claimed, consumer, max_deliveries):
                    return claimed
        return None

    async def dead_letter_if_exhausted(self, claimed: ClaimedJob, worker_id: str, max_deliveries: int) -> bool:
        """Dead-letter a job delivered more than `max_deliveries` times in all (every stream it was on
        counted); True if it was."""
        if claimed.deliveries <= max_deliveries:
            return False
        await self.dead_letter(
            claimed,
            worker_id,
            f"delivered {claimed.deliveries} times; every worker that took it stopped before finishing",
        )
        return True

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
        for _ in range(REHOME_ROUNDS):
            while entries := await self._entries(stream, 100):
                for entry_id, fields in entries:
                    moved += await self._rehome_entry(stream, _text(entry_id), fields)
            # Emptiness is checked again in the deleting script: a job submitted since the last read stays.
            if await self._drop_if_empty(keys=[stream, self._keys.job_streams]):
                break
        if moved:
            logger.warning("moved %d job(s) of departed worker stream %s to the shared streams", moved, stream)
        return moved

    async def _entries(self, stream: str, count: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
        entries: Any = await self._redis.xrange(stream, count=count)
        return list(entries)

    async def _rehome_entry(self, stream: str, entry_id: str, fields: dict[bytes, bytes]) -> int:
        try:
            job = _parse_entry(stream, entry_id, fields).job
        except MalformedJob as bad:
            logger.error("rejecting malformed job while rehoming: %s", bad)
            await self.reject(bad, "rehome", DEFAULT_RESULT_TTL_S)
            return 0
        target = self._keys.shape_stream(job.shape)
        await self.ensure_group(target)
        moved = await self._move(
            keys=[stream, target, self._keys.job(job.id)], args=[self._keys.workers_group, entry_id]
        )
        return int(moved)

    async def dead_letter(self, claimed: ClaimedJob, worker_id: str, reason: str) -> None:
        """Give up on a job: record it with its history on the dead-letter stream and fail it. Safe to run
        twice: only the first run records and fails it."""
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
        done = await self._dead_letter(
            keys=[*self._terminal_keys(claimed.stream, job.id), self._keys.dead_letter_stream],
            args=[
                self._keys.workers_group,
                claimed.entry_id,
                *self._terminal_args(job.id, job.result_ttl_s),
                result.model_dump_json(),
                job.model_dump_json(),
                claimed.deliveries,
                reason,
            ],
        )
        if done:
            logger.error("job %s dead-lettered: %s", job.id, reason)

    async def stats(self) -> dict[str, int]:
        """Cluster-wide counters: duplicate_results, reclaimed, dead_lettered."""
        raw: dict[bytes, bytes] = await self._redis.hgetall(self._keys.stats)  # type: ignore[assignment]
        return {_text(k): int(v) for k, v in raw.items()}

    async def complete(self, claimed: ClaimedJob, result: JobResult, images: list[bytes]) -> bool:
        """Store a result, announce it, then acknowledge the entry, if this delivery may: the job is not
        terminal and this delivery is its current attempt (or none was started).

        Returns False when the result was refused (the job already had one, was cancelled, or another
        attempt holds it). Safe to run twice: a rerun after a stored result returns True again.
        """
        outcome = await self._store_and_ack(
            claimed.stream,
            claimed.entry_id,
            result,
            images,
            claimed.job.result_ttl_s,
            claimed.token,
            claimed.enqueued_ms,
        )
        return outcome == "stored"

    async def reject(self, malformed: MalformedJob, worker_id: str, ttl_s: int) -> None:
        """Settle an unparseable entry: fail its job if it named one (and is not terminal), acknowledge it,
        and count it (`malformed_entries`)."""
        await self._redis.hincrby(self._keys.stats, "malformed_entries", 1)
        if malformed.job_id is not None:
            result = JobResult(
                id=malformed.job_id, status="failed", worker=worker_id, error=f"invalid job: {malformed.reason}"
            )
            await self._store_and_ack(malformed.stream, malformed.entry_id, result, [], ttl_s, "", 0)
            return
        await self._redis.xack(malformed.stream, self._keys.workers_group, malformed.entry_id)
        await self._redis.xdel(malformed.stream, malformed.entry_id)

    async def _store_and_ack(
        self,
        stream: str,
        entry_id: str,
        result: JobResult,
        images: list[bytes],
        ttl_s: int,
        token: str,
        enqueued_ms: int,
    ) -> str:
        outcome = await self._store(
            keys=self._terminal_keys(stream, result.id),
            args=[
                self._keys.workers_group,
                entry_id,
                *self._terminal_args(result.id, ttl_s),
                result.model_dump_json(),
                result.status,
                token,
                enqueued_ms,
                *images,
            ],
        )
        return _text(outcome)

    def _terminal_keys(self, stream: str, job_id: str) -> list[str]:
        """KEYS of the scripts that make a job terminal: result, stream, record, stats, attempts."""
        keys = self._keys
        return [keys.result(job_id), stream, keys.job(job_id), keys.stats, keys.attempts(job_id)]

    def _terminal_args(self, job_id: str, result_ttl_s: int) -> list[Any]:
        """ARGV 3-6 of those scripts: result ttl, record ttl, completions channel, job id."""
        return [result_ttl_s, record_ttl(result_ttl_s), self._keys.completions_channel, job_id]

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

    async def statuses(self, job_ids: list[str]) -> list[str | None]:
        """The status of each job (None for an unknown one), in one pipelined round trip."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(self._keys.job(job_id), "status")
            found = await pipe.execute()
        return [None if status is None else _text(status) for status in found]

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
        keys: Keys,
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


def record_ttl(result_ttl_s: int) -> int:
    """How long a terminal job's record lives: longer than its result."""
    return result_ttl_s * RECORD_TTL_FACTOR


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
