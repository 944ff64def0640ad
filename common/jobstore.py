"""Jobs as records and results: submit, cancel and read them.

Submitting writes the job's record and its stream entry in one script (with an idempotency key, at most one
job per key; with a maximum depth, never past it). A job's record says where it is and who runs it; its
result, once a worker stored one (or it was cancelled), holds the metadata and the images. A cancelled job
gets a `cancelled` result at once, so a worker's later result is dropped. Claiming and settling deliveries is
the worker's side (worker/delivery.py); the streams themselves are common/streams.py.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Literal, get_args

import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.exceptions import ResponseError

from common.blobstore import BlobStore, BlobStoreMismatch
from common.groupcommit import GroupCommit
from common.protocol import Job, JobResult
from common.redis_conn import text
from common.rediskeys import RedisKeys
from common.scripts import register
from common.webhooks import OutboxFull, WebhookSpec

logger = logging.getLogger(__name__)

# A terminal job's record outlives its images by this factor, so a result arriving after they expired is
# still refused: the record says the job is terminal (docs/delivery.md).
RECORD_TTL_FACTOR = 2
# The lifetime of a result stored for a job whose request could not be read.
DEFAULT_RESULT_TTL_S = 3600

# When a submit counts as accepted: `off` once the primary has the job (a failover in the next moment can
# lose it), `replica` once a replica has it too (WAIT), `aof` once the primary's append-only file has it on
# disk (WAITAOF, Redis 7.2+).
DurableAccept = Literal["off", "replica", "aof"]
DURABLE_ACCEPT: tuple[str, ...] = get_args(DurableAccept)


class NotDurable(Exception):
    """The job was written to the primary, but a replica or its disk did not confirm it in time.

    The job may exist and may run: a client retrying with the same `Idempotency-Key` gets that job, not a
    second one.
    """

    def __init__(self, job_id: str, mode: str, timeout_ms: int) -> None:
        super().__init__(f"job {job_id}: not confirmed by {mode} within {timeout_ms} ms")
        self.job_id = job_id
        self.mode = mode


class DurabilityUnsupported(Exception):
    """The Redis server cannot confirm what `--durable-accept` asks for."""


class QueueFull(Exception):
    """The stream already holds its maximum of jobs; nothing was queued."""

    def __init__(self, stream: str, depth: int, max_depth: int) -> None:
        super().__init__(f"stream {stream} holds {depth} jobs (at most {max_depth})")
        self.stream = stream
        self.depth = depth
        self.max_depth = max_depth


class TooManyInFlight(Exception):
    """The caller already has its maximum of jobs queued or running; nothing was queued."""

    def __init__(self, held: int, cap: int) -> None:
        super().__init__(f"the caller has {held} jobs in flight (at most {cap})")
        self.held = held
        self.cap = cap


class IdempotencyConflict(Exception):
    """An `Idempotency-Key` reused with a different request."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"the key was first used for job {job_id} with a different request")
        self.job_id = job_id


@dataclass(frozen=True)
class Submitter:
    """Who submits a job. `scope` names its own idempotency keys (another caller's same key is another key);
    `owner` is kept in the job's record; with `max_in_flight` > 0, at most that many of the jobs submitted
    under `identity` are queued or running at once. Neither is ever a secret: a key's digest prefix, an
    address."""

    scope: str = ""
    owner: str = ""
    identity: str = ""
    max_in_flight: int = 0


ANYONE = Submitter()


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
        def get(name: str) -> str | None:  # a field that is not text is as good as missing
            value = fields.get(name.encode())
            return None if value is None else value.decode(errors="replace")

        return cls(
            status=get("status") or "queued",
            job=_job_or_none(get("job")),
            entry_id=get("entry"),
            stream=get("stream"),
            worker=get("worker"),
            step=_int_or_none(get("step")),
            total=_int_or_none(get("total")),
        )


@dataclass(frozen=True)
class StoredResult:
    """A finished job as read back: metadata and the encoded images in order."""

    result: JobResult
    images: list[bytes]


class JobStore:
    """Submit, cancel and read the jobs of one cluster."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: RedisKeys,
        durable_accept: DurableAccept = "off",
        durable_timeout_ms: int = 1000,
        blobs: BlobStore | None = None,
    ) -> None:
        self._redis = redis
        self.blobs = blobs  # where results' images are, when not in Redis
        self._keys = keys
        self._durable_accept = durable_accept
        self._durable_timeout_ms = durable_timeout_ms
        self._submit = register(redis, "submit")
        self._cancel = register(redis, "cancel")
        self._group = (
            None
            if durable_accept == "off"
            else GroupCommit(redis, self._submit, aof=durable_accept == "aof", timeout_ms=durable_timeout_ms)
        )

    async def submit(
        self,
        job: Job,
        stream: str,
        idempotency_key: str | None = None,
        fingerprint: str = "",
        max_depth: int = 0,
        submitter: Submitter = ANYONE,
        webhook: WebhookSpec | None = None,
        max_outbox: int = 0,
    ) -> Submitted:
        """Record and enqueue a job on `stream` atomically.

        With an idempotency key, only the first submit (of the same submitter's scope) creates a job; a later
        one with the same key and `fingerprint` (a digest of the request) refers to that job, and one with
        another request raises IdempotencyConflict. The key and the record live until the job is terminal, then
        as long as its result (the record twice that). With `max_depth`, a stream that already holds that many
        jobs takes no more: QueueFull (a replay of a key's job still succeeds). A submitter at its cap of jobs
        in flight is refused: TooManyInFlight. A `webhook` is kept in the record; with `max_outbox`, refused
        (OutboxFull) while that many jobs have webhook messages due. Safe to run twice: a rerun for the same job
        answers as the first run did and queues nothing more.
        """
        keys = [self._keys.job(job.id), stream, self._keys.job_streams, self._keys.webhooks_due]
        if idempotency_key is not None:
            keys.append(self._keys.idempotency(idempotency_key, submitter.scope))
        cap = submitter.max_in_flight if submitter.identity else 0
        if cap:
            keys.append(self._keys.in_flight(submitter.identity))
        args: list[Any] = [job.model_dump_json(), job.result_ttl_s, job.id, fingerprint, max_depth]
        args += [submitter.owner, cap, self._keys.job("")]
        args += [webhook.to_json(), webhook.events_field(), max_outbox] if webhook else ["", "", 0]
        if self._durable_accept == "off":
            outcome, value = await self._submit(keys=keys, args=args)
        else:
            outcome, value = await self._submit_durably(job.id, keys, args)
        if text(outcome) == "full":
            raise QueueFull(stream, int(value), max_depth)
        if text(outcome) == "outbox-full":
            raise OutboxFull(int(value), max_outbox)
        if text(outcome) == "busy":
            raise TooManyInFlight(int(value), submitter.max_in_flight)
        job_id, _, first_fingerprint = text(value).partition(" ")
        if first_fingerprint != fingerprint:
            raise IdempotencyConflict(job_id)
        return Submitted(job_id=job_id, created=text(outcome) == "created")

    async def check_durability(self) -> None:
        """Raise DurabilityUnsupported if the server lacks the command durable acceptance needs (WAITAOF came
        with Redis 7.2), so a gateway fails at start rather than on every submit."""
        if self._durable_accept != "aof":
            return
        try:
            await self._redis.execute_command("WAITAOF", 0, 0, 0)
        except ResponseError as exc:
            version = (await self._redis.info("server")).get("redis_version", "unknown")
            raise DurabilityUnsupported(
                f"--durable-accept aof needs WAITAOF (Redis 7.2+); Redis {version}: {exc}"
            ) from None

    async def _submit_durably(self, job_id: str, keys: list[str], args: list[Any]) -> list[Any]:
        """Run the submit script in the next batch of the group commit, whose one WAIT (or WAITAOF) confirms
        every submit in it (common/groupcommit.py)."""
        assert self._group is not None
        reply, held = await self._group.run(keys, args)
        # A replay or a full stream wrote nothing new, but WAIT still tells whether what the key's job
        # wrote earlier reached a replica: the same rule for all answers keeps this simple.
        if not held:
            raise NotDurable(job_id, self._durable_accept, self._durable_timeout_ms)
        result: list[Any] = reply
        return result

    async def cancel(self, job_id: str) -> str | None:
        """Cancel a job unless it already finished.

        Returns None for an unknown job, `cancelled` if this call (or an earlier one) cancelled it, and the
        final status (`succeeded` or `failed`) of a job that finished first. A queued job never runs; a
        running one stops at a denoising step soon after (its worker learns of it from a progress report).
        """
        record = await self.record(job_id)
        if record is None:
            return None
        job = record.job
        meta = JobResult(
            id=job_id,
            status="cancelled",
            worker=record.worker,
            seed=job.params.seed if job else None,
            shape=job.params.shape if job else None,
            scheduler=job.params.scheduler if job else None,
        ).model_dump_json()
        ttl = job.result_ttl_s if job else DEFAULT_RESULT_TTL_S
        stream = record.stream or self._keys.size_stream(job.params.shape.size if job else "unknown")
        outcome = await self._cancel(
            keys=terminal_keys(self._keys, stream, job_id), args=["", "", *terminal_args(self._keys, job_id, ttl), meta]
        )
        if outcome is None:
            return None
        outcome = text(outcome)
        return "cancelled" if outcome == "cancelled-now" else outcome

    async def record(self, job_id: str) -> JobRecord | None:
        """A job's stored state, or None for an unknown (or expired) job."""
        fields: dict[bytes, bytes] = await self._redis.hgetall(self._keys.job(job_id))  # type: ignore[assignment]
        return JobRecord.from_fields(fields) if fields else None

    async def statuses(self, job_ids: list[str]) -> list[str | None]:
        """The status of each job (None for an unknown one), in one pipelined round trip."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(self._keys.job(job_id), "status")
            found = await pipe.execute()
        return [None if status is None else text(status) for status in found]

    async def owner(self, job_id: str) -> str | None:
        """Who owns a job (`''` for nobody in particular); None when its record is gone or has no owner."""
        owner = await self._redis.hget(self._keys.job(job_id), "owner")
        return None if owner is None else text(owner)

    async def job_status(self, job_id: str) -> str | None:
        """`queued`, `running`, `succeeded`, `failed` or `cancelled` while the job's record lives; None for an
        unknown id."""
        status = await self._redis.hget(self._keys.job(job_id), "status")
        return None if status is None else text(status)

    async def fetch_result(self, job_id: str) -> StoredResult | None:
        """The stored result of a job, or None if it has not finished (or has expired)."""
        fields: dict[bytes, bytes] = await self._redis.hgetall(self._keys.result(job_id))  # type: ignore[assignment]
        if not fields:
            return None
        result = JobResult.model_validate_json(fields[b"meta"])
        if result.image_keys is not None:
            images = list(await asyncio.gather(*(self._blob(key) for key in result.image_keys)))
        else:
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
        result = JobResult.model_validate_json(meta)
        if result.image_keys is not None:
            image = await self._blob(result.image_keys[index]) if index < len(result.image_keys) else None
        return result, image

    async def _blob(self, key: str) -> bytes:
        """An image kept in the blob store. BlobStoreUnavailable (retry later) and BlobNotFound pass up."""
        if self.blobs is None:
            raise BlobStoreMismatch(
                "this result's images are in a blob store and this gateway has none: --blob-store must be the same "
                "on every gateway and worker"
            )
        return await self.blobs.get(key)

    async def image_url(self, result: JobResult, index: int, expires_s: int) -> str | None:
        """A pre-signed URL of image `index` of a result whose images are in an object store that has them;
        None otherwise (the caller serves the bytes)."""
        if self.blobs is None or result.image_keys is None or index >= len(result.image_keys):
            return None
        return await self.blobs.presign(result.image_keys[index], expires_s)


def record_ttl(result_ttl_s: int) -> int:
    """How long a terminal job's record (and its history) lives: longer than its result."""
    return result_ttl_s * RECORD_TTL_FACTOR


def terminal_keys(keys: RedisKeys, stream: str, job_id: str) -> list[str]:
    """KEYS of the scripts that make a job terminal (store, cancel, dead-letter): result, the stream its entry
    is on, record, stats, attempts, then the webhook's (`webhook_keys`)."""
    return [
        keys.result(job_id),
        stream,
        keys.job(job_id),
        keys.stats,
        keys.attempts(job_id),
        *webhook_keys(keys, job_id),
    ]


def webhook_keys(keys: RedisKeys, job_id: str) -> list[str]:
    """The keys a script that may make a webhook event due takes last: the due set and the job's outbox."""
    return [keys.webhooks_due, keys.webhook(job_id)]


def terminal_args(keys: RedisKeys, job_id: str, result_ttl_s: int) -> list[Any]:
    """ARGV 3 to 6 of those scripts: the result's lifetime, the record's, the completions channel, the job."""
    return [result_ttl_s, record_ttl(result_ttl_s), keys.completions_channel, job_id]


def _job_or_none(raw: str | None) -> Job | None:
    """The request stored in a record; None (logged) for one that does not parse: bad data never stops a
    reader."""
    if raw is None:
        return None
    try:
        return Job.model_validate_json(raw)
    except ValidationError:
        logger.warning("a job record holds a request that does not parse: %r", raw[:200])
        return None


def _int_or_none(raw: str | None) -> int | None:
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        logger.warning("a job record holds %r where a number belongs", raw[:50])
        return None
