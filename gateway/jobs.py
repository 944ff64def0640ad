"""Jobs as the HTTP API sees them: made from a request, submitted (idempotently), awaited, described.

Every route that creates or reads jobs goes through here, so `/v1/generate`, `/v1/jobs` and the OpenAI
route resolve shapes and schedulers, draw seeds, honour `Idempotency-Key` and describe results the same way.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from aiohttp import web

from common import strength as strength_rule
from common.inputs import Inputs, RedisCopy
from common.jobstore import (
    ANYONE,
    IdempotencyConflict,
    JobRecord,
    JobStore,
    NotDurable,
    QueueFull,
    StoredResult,
    Submitted,
    Submitter,
    TooManyInFlight,
)
from common.protocol import (
    DEFAULT_IMAGES,
    DEFAULT_QUALITY,
    FINISHED,
    JOB_ID_PATTERN,
    Job,
    JobResult,
    RequestKind,
    ResolvedParams,
    Shape,
    default_strength,
    request_kind,
)
from common.redis_conn import UNAVAILABLE
from common.registry import SERVING_STATES, WorkerInfo
from common.webhooks import OutboxFull
from gateway.errors import ApiError
from gateway.job_webhooks import outbox_full, webhook_args, webhook_of
from gateway.journal import Accepted
from gateway.limits import queue_full
from gateway.requestlog import REQUEST_ID
from gateway.schemas import ErrorDetail, GenerateRequest, JobOutput, JobState, Progress, ResponseTimings
from gateway.shapes import resolve, runs
from gateway.state import CONFIG, JOBS, JOURNAL, LISTENER, PLACEMENT, POLICY, REGISTRY, STREAMS, THROUGHPUT, WAITERS
from gateway.tenants import caller_of, too_many_in_flight

logger = logging.getLogger(__name__)

IDEMPOTENCY_HEADER = "Idempotency-Key"
# Set by `submit`: whether the request's Idempotency-Key referred to an earlier job instead of queueing one.
REPLAYED = web.RequestKey("replayed", bool)
_JOB_ID = re.compile(JOB_ID_PATTERN)
MAX_IDEMPOTENCY_KEY = 255


def status_url(job_id: str) -> str:
    return f"/v1/jobs/{job_id}"


def events_url(job_id: str) -> str:
    return f"/v1/jobs/{job_id}/events"


def image_url(job_id: str, index: int) -> str:
    return f"/v1/jobs/{job_id}/images/{index}"


@dataclass(frozen=True)
class Placed:
    """A job ready to queue, the stream the routing policy chose for it, and the workers it was chosen from."""

    job: Job
    stream: str
    workers: list[WorkerInfo]
    images: str | None = None  # the digest of its input images' bytes (gateway/inputs.py Uploaded), if any
    inputs_copy: RedisCopy | None = None  # its input images' bytes, when stored in Redis: the journal keeps them


async def make_job(
    request: web.Request,
    body: GenerateRequest,
    workers: list[WorkerInfo] | None = None,
    default_n: int = DEFAULT_IMAGES,
    inputs: Inputs | None = None,
) -> Placed:
    """Resolve shape and scheduler against the live workers (read now unless given), draw a seed when none was
    given, check `n` (the route's `default_n` when the request names none), route the job: the request's
    generation parameters go into the job whole, and only to a worker that runs its kind (text to image; from input
    images, `inputs`, decoded: image to image, or inpainting with a mask), with the default strength when an image
    comes without one. The prompt policy is asked first: a refused prompt is answered before anything is looked up
    or queued."""
    if body.strength is not None and inputs is None:
        raise ApiError(
            400, "strength_without_image", "strength: applies to an input image (send image)", field="strength"
        )
    await request.app[POLICY].check(body.prompt, body.negative_prompt)
    if workers is None:
        workers = await request.app[REGISTRY].workers()
    kind = request_kind(inputs is not None, inputs is not None and inputs.mask is not None)
    resolved = resolve(body, workers, kind)
    seed = body.seed if body.seed is not None else secrets.randbelow(2**32)
    params = body.resolved(resolved.shape, seed, resolved.scheduler)
    if body.n is None:
        params = params.model_copy(update={"n": default_n})
    if inputs is not None and params.strength is None:
        params = params.model_copy(update={"strength": default_strength(inputs.mask is not None)})
    check_strength(params)
    loras = [lora.name for lora in params.loras]
    check_n(params.n, params.shape, params.scheduler, workers, loras, kind)
    job = Job(
        id=uuid.uuid4().hex,
        params=params,
        output_format=body.output_format,
        quality=body.quality if body.quality is not None else DEFAULT_QUALITY,
        result_ttl_s=request.app[CONFIG].result_ttl_s,
        request_id=request.get(REQUEST_ID),
    )
    stream = await request.app[PLACEMENT].stream_for(
        job.params.shape, job.params.scheduler, workers, job.params.n, loras, kind
    )
    return Placed(job=job, stream=stream, workers=workers)


def check_strength(params: ResolvedParams) -> None:
    """Refuse, before queueing, a strength that runs no step of the request's schedule, by the rule the worker runs
    by (common/strength.py); the schema has kept it within 0 < strength <= 1."""
    if params.strength is None:
        return
    try:
        strength_rule.check_strength(params.num_inference_steps, params.strength)
    except strength_rule.StrengthError as exc:
        raise ApiError(400, "strength_too_small", str(exc), field="strength") from None


def check_n(
    n: int,
    shape: Shape,
    scheduler: str,
    workers: list[WorkerInfo],
    loras: Sequence[str] = (),
    kind: RequestKind = "text-to-image",
) -> None:
    """Refuse, before queueing, more images than a worker that may run the job (with its adapters `loras`, of its
    request `kind`) makes per request: on a shared stream any of them may claim it, so the bound is the least any of
    them advertises."""
    able = [w for w in workers if w.state in SERVING_STATES and runs(w, shape, scheduler, loras, kind)]
    most = min((w.images_per_request for w in able), default=None)
    if most is not None and n > most:
        raise ApiError(
            400,
            "less_than_equal",
            f"n: Input should be less than or equal to {most}, the images a worker makes per request",
            field="n",
        )


def request_fingerprint(body: GenerateRequest, images: str | None = None) -> str:
    """What an `Idempotency-Key` binds to: the validated body, and the input images' digest (`images`, a hash of
    their bytes; the base64 text itself is left out, so the same images sent as multipart or base64 bind alike). The
    fields added since keys were first stored (`n`, `loras`, `strength`, `image`, `mask`) are left out when the
    request does not use them, so a key stored before still matches its retry."""
    unnamed = {"image", "mask"} | ({"n"} if body.n is None else set()) | ({"loras"} if not body.loras else set())
    unnamed |= {"strength"} if body.strength is None else set()
    dumped = body.model_dump_json(exclude=unnamed)
    return hashlib.sha256((dumped if images is None else f"{dumped}\nimages {images}").encode()).hexdigest()


def idempotency_key(request: web.Request) -> str | None:
    """The request's `Idempotency-Key`, checked: 1..255 printable ASCII characters."""
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return None
    if not 0 < len(key) <= MAX_IDEMPOTENCY_KEY or not key.isascii() or not key.isprintable():
        raise ApiError(
            400,
            "invalid_header",
            f"{IDEMPOTENCY_HEADER} must be 1..{MAX_IDEMPOTENCY_KEY} printable ASCII characters",
            field=IDEMPOTENCY_HEADER,
        )
    return key


async def submit(request: web.Request, body: GenerateRequest, placed: Placed) -> Submitted:
    """Queue `job`, or with an `Idempotency-Key` already seen, refer to the job that key created.

    The key binds to the request (its validated body), not to the drawn seed: a retry of a request that
    asked for a random seed gets the same job, and the same images. Keys are the caller's own, and the job
    records its caller as its owner (gateway/tenants.py).
    """
    key = idempotency_key(request)
    fingerprint = request_fingerprint(body, placed.images) if key else ""
    config = request.app[CONFIG]
    who = submitter(request)
    webhook = await webhook_of(request, body)
    job = placed.job if webhook is None else placed.job.model_copy(update={"webhook": webhook.to_json()})
    try:
        submitted = await request.app[JOBS].submit(
            job,
            placed.stream,
            key,
            fingerprint,
            max_depth=config.max_queue_depth,
            submitter=who,
            **webhook_args(webhook, config.webhooks.max_outbox),
        )
    except OutboxFull as exc:
        raise outbox_full(exc) from None
    except QueueFull as exc:
        raise queue_full(exc, request.app[THROUGHPUT]) from None
    except NotDurable as exc:
        raise not_durable(exc) from None
    except TooManyInFlight as exc:
        raise too_many_in_flight(exc, request.app[THROUGHPUT]) from None
    except IdempotencyConflict as exc:
        raise ApiError(
            422,
            "idempotency_key_reused",
            f"{IDEMPOTENCY_HEADER} was already used for another "
            f"request (job {exc.job_id}); use a new key for a new request",
            field=IDEMPOTENCY_HEADER,
            id=exc.job_id,
        ) from None
    request[REPLAYED] = not submitted.created
    if submitted.created:
        request.app[JOURNAL].add(Accepted(job, key, fingerprint, who, webhook=webhook, inputs=placed.inputs_copy))
        logger.info("job %s queued on %s", submitted.job_id, placed.stream, extra={"job_id": submitted.job_id})
    else:
        logger.info("job %s replayed for its Idempotency-Key", submitted.job_id, extra={"job_id": submitted.job_id})
    return submitted


def replay_headers(request: web.Request) -> dict[str, str]:
    """`Idempotent-Replayed: true` for a request that `submit` answered with an earlier job, as Stripe does."""
    return {"Idempotent-Replayed": "true"} if request.get(REPLAYED) else {}


def not_durable(exc: NotDurable) -> ApiError:
    """Not accepted: the client must not count on the job. It may still run; the same Idempotency-Key makes
    the retry refer to it instead of queueing a second one."""
    return ApiError(
        503,
        "not_durable",
        f"the job was not confirmed by {exc.mode} in time; retry with the same {IDEMPOTENCY_HEADER}",
        headers={"Retry-After": "1"},
        id=exc.job_id,
    )


def submitter(request: web.Request) -> Submitter:
    """The request's caller as a submitter: its idempotency scope, the owner its jobs record, its cap."""
    caller = caller_of(request)
    if caller is None:
        return ANYONE
    cap = request.app[CONFIG].max_jobs_in_flight_per_caller if caller.tenant else 0
    return Submitter(scope=caller.scope, owner=caller.owner, identity=caller.identity, max_in_flight=cap)


async def submit_and_wait(request: web.Request, body: GenerateRequest, placed: Placed) -> StoredResult:
    """Submit and wait for the result within the request timeout (504 with the job id past it); a full queue,
    or a caller with its cap of waiting requests (replays included), is a 429 and queues nothing."""
    with request.app[WAITERS].hold(caller_of(request)):
        return await _submit_and_wait(request, body, placed)


async def _submit_and_wait(request: web.Request, body: GenerateRequest, placed: Placed) -> StoredResult:
    listener = request.app[LISTENER]
    queue = request.app[JOBS]
    job = placed.job
    done = listener.expect(job.id)
    job_id = job.id
    try:
        submitted = await submit(request, body, placed)  # a Redis error here means not accepted: 503
        if not submitted.created:  # a replay: the job may have finished long ago
            listener.forget(job.id, done)
            job_id = submitted.job_id
            done = listener.expect(job_id)
            if await queue.fetch_meta(job_id) is not None:
                return await _read_result(queue, job_id)
        async with asyncio.timeout(request.app[CONFIG].request_timeout_s):
            await done
            return await _read_result(queue, job_id)
    except TimeoutError:
        raise ApiError(
            504,
            "timeout",
            "the job did not finish in time; it is still queued or running "
            "and its result can be fetched from status_url",
            id=job_id,
            status_url=status_url(job_id),
        ) from None
    except UNAVAILABLE:
        raise ApiError(
            503,
            "queue_unavailable",
            "the job was accepted but its result cannot be read right now; fetch it from status_url",
            headers={"Retry-After": "2"},
            id=job_id,
            status_url=status_url(job_id),
        ) from None
    finally:
        listener.forget(job_id, done)


def raise_unless_succeeded(stored: StoredResult) -> None:
    """A synchronous route answers an error for a job that failed or was cancelled meanwhile."""
    result = stored.result
    if result.status == "cancelled":
        raise ApiError(409, "cancelled", "the job was cancelled before it finished", id=result.id)
    if result.status != "succeeded":
        raise ApiError(500, "generation_failed", result.error or "generation failed", id=result.id)


async def _read_result(queue: JobStore, job_id: str) -> StoredResult:
    stored = await queue.fetch_result(job_id)
    if stored is None:  # stored, announced, then expired within the instant: vanishingly rare
        raise ApiError(500, "result_expired", "the result expired before it could be read", id=job_id)
    return stored


def response_timings(result: JobResult, received: float | None, now: float) -> ResponseTimings:
    """The worker's timings plus the gateway's end-to-end figure (None for a result fetched later)."""
    assert result.timings is not None
    total_ms = (now - received) * 1000 if received is not None else None
    return ResponseTimings(**result.timings.model_dump(), total_ms=total_ms)


def job_output(result: JobResult) -> JobOutput:
    """A succeeded job's result as the job API shows it: metadata and image URLs."""
    assert result.shape is not None and result.seed is not None and result.scheduler is not None
    assert result.worker is not None
    return JobOutput(
        seed=result.seed,
        width=result.shape.width,
        height=result.shape.height,
        num_inference_steps=result.shape.steps,
        scheduler=result.scheduler,
        worker=result.worker,
        media_type=result.media_type,
        images=[image_url(result.id, k) for k in range(result.image_count)],
        timings=response_timings(result, None, 0.0),
        nsfw=result.nsfw,
    )


def finished_state(result: JobResult) -> JobState:
    """The state of a job that has a stored result."""
    if result.status == "succeeded":
        return JobState(id=result.id, status="succeeded", worker=result.worker, result=job_output(result))
    if result.status == "cancelled":
        return JobState(id=result.id, status="cancelled", worker=result.worker)
    return JobState(
        id=result.id,
        status="failed",
        worker=result.worker,
        error=ErrorDetail(code="generation_failed", message=result.error or "generation failed"),
    )


def live_state(job_id: str, record: JobRecord, position: int | None) -> JobState:
    """The state of a job still queued or running, from its record."""
    progress = (
        Progress(step=record.step, total=record.total) if record.step is not None and record.total is not None else None
    )
    status = record.status if record.status in ("queued", "running") else "queued"
    return JobState(
        id=job_id,
        status=status,  # type: ignore[arg-type]
        worker=record.worker if status == "running" else None,
        queue_position=position if status == "queued" else None,
        progress=progress if status == "running" else None,
    )


async def read_state(app: web.Application, job_id: str) -> tuple[JobState, JobRecord | None] | None:
    """A job's state (with its record while it is live), or None for an unknown or expired job."""
    queue = app[JOBS]
    result = await queue.fetch_meta(job_id)
    if result is not None:
        return finished_state(result), None
    record = await queue.record(job_id)
    if record is None:
        return None
    if record.status in FINISHED:  # finished since the first read, or its result expired (as good as unknown)
        result = await queue.fetch_meta(job_id)
        return None if result is None else (finished_state(result), None)
    position = None
    if record.status == "queued" and record.entry_id is not None and record.stream is not None:
        position = (await app[STREAMS].positions(record.stream, [record.entry_id]))[record.entry_id]
    return live_state(job_id, record, position), record


def job_id_of(request: web.Request) -> str:
    """The `{job_id}` of the URL; one that no job can have is a 404 without asking Redis."""
    job_id = request.match_info["job_id"]
    if _JOB_ID.fullmatch(job_id) is None:
        raise unknown_job(job_id[:80])
    return job_id


async def visible_job_id(request: web.Request) -> str:
    """The `{job_id}` of the URL, if the caller may see that job; otherwise the very 404 of an unknown id, so
    that another caller's job cannot be told from one that never existed."""
    job_id = job_id_of(request)
    caller = caller_of(request)
    if caller is not None and caller.tenant and not caller.admin:
        if not caller.may_see(await request.app[JOBS].owner(job_id)):
            raise unknown_job(job_id)
    return job_id


def unknown_job(job_id: str) -> ApiError:
    return ApiError(404, "unknown_job", f"no job {job_id!r} (never submitted, or its result expired)", field="job_id")
