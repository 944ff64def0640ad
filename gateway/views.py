"""Request handlers. They validate, talk to the queue, and raise ApiError for the client's mistakes."""

from __future__ import annotations

import base64
import hmac
import time
from pathlib import Path
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from common.jobstore import StoredResult
from common.protocol import FINISHED
from common.registry import SERVING_STATES
from gateway import inputs, job_webhooks, jobs
from gateway.errors import ApiError, from_validation_error
from gateway.loras import lora_list
from gateway.metrics import CONTENT_TYPE
from gateway.schemas import GenerateRequest, GenerateResponse, JobAccepted, JobState, ModelList, WorkerList
from gateway.shapes import model_cards
from gateway.signed_urls import is_signed
from gateway.state import (
    CONFIG,
    JOBS,
    JOURNAL,
    LISTENER,
    METRICS,
    OPENAPI,
    OUTBOX,
    REDIS,
    REGISTRY,
    STREAMS,
    URL_SIGNER,
)

M = TypeVar("M", bound=BaseModel)

INDEX_HTML = Path(__file__).parent / "static" / "index.html"


async def index(request: web.Request) -> web.FileResponse:
    """The demo page."""
    return web.FileResponse(INDEX_HTML)


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.json_response({"status": "ok"})


async def list_workers(request: web.Request) -> web.Response:
    """The registered workers: id, host, devices, compiled shapes, state, jobs done, last heartbeat."""
    workers = await request.app[REGISTRY].workers()
    return _json(WorkerList(workers=workers, serving=sum(w.state in SERVING_STATES for w in workers)))


async def list_models(request: web.Request) -> web.Response:
    """The models the serving workers run, with the sizes, step range and schedulers they serve."""
    return _json(ModelList(data=model_cards(await request.app[REGISTRY].workers())))


async def list_loras(request: web.Request) -> web.Response:
    """The LoRA adapters the serving workers offer: which workers offer each, how many hold it loaded."""
    return _json(lora_list(await request.app[REGISTRY].workers()))


async def readyz(request: web.Request) -> web.Response:
    """Readiness of this gateway: Redis answers and the job listener is subscribed. Workers are no part of
    it: with none ready, a gateway taken out of service could not even say so; each submit answers 503
    `no_workers` or `no_ready_worker` with Retry-After instead (counted by `sdxl_gateway_rejections_total`),
    and the body reports how many are ready."""
    await request.app[REDIS].ping()  # unreachable: the error middleware answers 503
    if (trouble := request.app[LISTENER].health()) is not None:
        raise ApiError(503, "not_subscribed", trouble, headers={"Retry-After": "2"})
    workers = await request.app[REGISTRY].workers()
    return web.json_response({"status": "ready", "workers_ready": sum(w.state in SERVING_STATES for w in workers)})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus exposition: this gateway's request figures and the cluster's queue and workers."""
    if request.app[CONFIG].metrics_listen is not None:  # served on its own address instead
        raise web.HTTPNotFound()
    return await metrics_response(request.app, request)


async def metrics_response(app: web.Application, request: web.Request) -> web.Response:
    """The exposition of `app`'s figures, behind its metrics token when one is set."""
    _check_metrics_token(app[CONFIG].metrics_token, request)
    gauges = app[METRICS]
    gauges.queue_depth.set(await app[STREAMS].depth())
    gauges.webhook_outbox.set(await app[OUTBOX].depth())
    gauges.set_workers(await app[REGISTRY].workers())
    gauges.queue_counters.values = await app[STREAMS].counters()
    gauges.waiting.set(app[LISTENER].waiting)
    gauges.event_streams.set(app[LISTENER].watching)
    gauges.listener_counters.values = dict(app[LISTENER].counts) | {
        "resubmitted": app[JOURNAL].resubmitted,
        "webhooks_restored": app[JOURNAL].webhooks_restored,
        "inputs_restored": app[JOURNAL].inputs_restored,
        "inputs_dropped": app[JOURNAL].inputs_dropped,
    }
    return web.Response(body=gauges.exposition(), headers={"Content-Type": CONTENT_TYPE})


def _check_metrics_token(token: str | None, request: web.Request) -> None:
    if token is None:
        return
    header = request.headers.get("Authorization")
    scheme, _, given = (header or "").strip().partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode()):
        return
    raise ApiError(
        401,
        "invalid_metrics_token" if header else "missing_metrics_token",
        "/metrics needs Authorization: Bearer METRICS_TOKEN",
        field="Authorization",
        headers={"WWW-Authenticate": 'Bearer realm="sdxl-serve metrics"'},
    )


async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI description, built at start from the route table."""
    return web.json_response(request.app[OPENAPI])


async def generate(request: web.Request) -> web.Response:
    """Queue a generation and wait for its images (504 with the job id past the deadline)."""
    received = time.perf_counter()
    body, placed = await _placed(request)
    stored = await jobs.submit_and_wait(request, body, placed)
    jobs.raise_unless_succeeded(stored)
    return _json(_generate_response(stored, received), headers=jobs.replay_headers(request))


async def submit_job(request: web.Request) -> web.Response:
    """Queue a generation and answer at once, 202 with where to follow it."""
    body, placed = await _placed(request)
    submitted = await jobs.submit(request, body, placed)
    job_id = submitted.job_id
    status = "queued"
    if not submitted.created:
        state = await jobs.read_state(request.app, job_id)
        status = state[0].status if state is not None else status
    accepted = JobAccepted(
        id=job_id,
        status=status,  # type: ignore[arg-type]
        status_url=jobs.status_url(job_id),
        events_url=jobs.events_url(job_id),
    )
    headers = {"Location": accepted.status_url} | jobs.replay_headers(request)
    return _json(accepted, status=202, headers=headers)


async def _placed(request: web.Request) -> tuple[GenerateRequest, jobs.Placed]:
    """The request (JSON or multipart, with its input images decoded and checked), made into a job whose inputs are
    stored, ready to queue."""
    body, uploaded = await inputs.read_request(request, GenerateRequest)
    decoded = await uploaded.decoded(request.app[CONFIG].input_limits)
    placed = await jobs.make_job(request, body, inputs=decoded)
    return body, await inputs.store_uploaded(request, placed, decoded, uploaded)


async def job_status(request: web.Request) -> web.Response:
    """A job's state: queue position, progress, then its result (image URLs) or error."""
    job_id = await jobs.visible_job_id(request)
    state = await jobs.read_state(request.app, job_id)
    if state is None:
        raise jobs.unknown_job(job_id)
    webhook = await job_webhooks.webhook_state(request.app, job_id)
    return _json(state[0] if webhook is None else state[0].model_copy(update={"webhook": webhook}))


async def cancel_job(request: web.Request) -> web.Response:
    """Cancel a queued or running job; 409 for one that already succeeded or failed."""
    job_id = await jobs.visible_job_id(request)
    outcome = await request.app[JOBS].cancel(job_id)
    if outcome is None:
        raise jobs.unknown_job(job_id)
    if outcome != "cancelled":
        raise ApiError(
            409,
            "already_finished",
            f"job {job_id} already {outcome}; only queued or running jobs can be cancelled",
            field="job_id",
            job_status=outcome,
        )
    await inputs.remove_cancelled(request.app, job_id)
    state = await jobs.read_state(request.app, job_id)
    return _json(state[0] if state is not None else JobState(id=job_id, status="cancelled"))


async def job_image(request: web.Request) -> web.Response:
    """One image of a succeeded job, with its media type."""
    job_id = await _image_job_id(request)
    index = _image_index(request.match_info["index"])
    if (redirect := await _presigned(request, job_id, index)) is not None:
        return redirect
    found = await request.app[JOBS].fetch_image(job_id, index)
    if found is None:
        status = await request.app[JOBS].job_status(job_id)
        if status is None or status in FINISHED:  # a finished job without a result: its images expired
            raise jobs.unknown_job(job_id)
        raise ApiError(
            409,
            "not_finished",
            f"job {job_id} is {status}; its images exist once it has succeeded",
            field="job_id",
            job_status=status,
        )
    result, image = found
    if result.status != "succeeded":
        raise ApiError(
            409,
            "no_images",
            f"job {job_id} {result.status}; it has no images",
            field="job_id",
            job_status=result.status,
        )
    if image is None:
        raise ApiError(404, "unknown_image", f"job {job_id} has images 0..{result.image_count - 1}", field="index")
    return web.Response(
        body=image,
        content_type=result.media_type,
        headers={
            "Cache-Control": f"private, max-age={request.app[CONFIG].result_ttl_s}, immutable",
            "Content-Disposition": f'inline; filename="{job_id}-{index}.{_extension(result.media_type)}"',
        },
    )


async def _image_job_id(request: web.Request) -> str:
    """The job of an image URL, if the caller may fetch it: by its key, or by the URL's signature."""
    if not is_signed(request):
        return await jobs.visible_job_id(request)
    job_id = jobs.job_id_of(request)
    owner = await request.app[JOBS].owner(job_id)
    if owner is None:
        raise jobs.unknown_job(job_id)
    request.app[URL_SIGNER].check(request, owner)
    return job_id


async def _presigned(request: web.Request, job_id: str, index: int) -> web.Response | None:
    """With `--image-urls presigned`, a redirect to the object store for an image of a succeeded job; None
    when the image is served here (another mode, another status, images kept in Redis)."""
    config = request.app[CONFIG]
    if config.image_urls != "presigned":
        return None
    result = await request.app[JOBS].fetch_meta(job_id)
    if result is None or result.status != "succeeded":
        return None  # the usual answers (unknown, not finished, no images) come from the path below
    url = await request.app[JOBS].image_url(result, index, config.result_ttl_s)
    if url is None:
        return None
    # 307: the client fetches the object from the store itself; the URL is good as long as the result.
    return web.Response(status=307, headers={"Location": url, "Cache-Control": "private, no-store"})


def _image_index(text: str) -> int:
    if not text.isdigit() or len(text) > 4:
        raise ApiError(404, "unknown_image", "the image index must be a small non-negative integer", field="index")
    return int(text)


def _extension(media_type: str) -> str:
    return {"image/jpeg": "jpg"}.get(media_type, media_type.rpartition("/")[2])


async def parse_body(request: web.Request, model: type[M]) -> M:
    """The JSON body validated against `model` and the gateway's limits; 415 for another media type, 400
    naming the field."""
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "send the body as application/json")
    raw = await inputs.read_bounded(request)  # past the route's limit: 413, read no further
    try:
        return model.model_validate_json(raw, context=request.app[CONFIG].limits.context())
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def _generate_response(stored: StoredResult, received: float | None) -> GenerateResponse:
    """The synchronous response body; `received` (perf_counter at arrival) gives total_ms."""
    result = stored.result
    assert result.shape is not None and result.seed is not None and result.scheduler is not None
    assert result.worker is not None
    images = [base64.b64encode(image).decode("ascii") for image in stored.images]
    return GenerateResponse(
        id=result.id,
        seed=result.seed,
        width=result.shape.width,
        height=result.shape.height,
        num_inference_steps=result.shape.steps,
        scheduler=result.scheduler,
        worker=result.worker,
        images=images,
        timings=jobs.response_timings(result, received, time.perf_counter()),
        nsfw=result.nsfw,
    )


def _json(model: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    # Optional fields that do not apply (a queued job's result, ...) are left out rather than sent as null.
    exclude_none = isinstance(model, JobState)
    return web.Response(
        body=model.model_dump_json(exclude_none=exclude_none),
        status=status,
        content_type="application/json",
        headers=headers,
    )
