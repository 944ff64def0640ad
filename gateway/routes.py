"""URL table of the gateway: every route with the schemas it validates and answers with.

The same table registers the handlers and generates `/openapi.json` (gateway/openapi.py), so the
published description cannot drift from what the code accepts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import BaseModel

from gateway import events, openai_api, views
from gateway.jobs import IDEMPOTENCY_HEADER
from gateway.limits import OPEN, Access
from gateway.schemas import (
    JOB_EVENTS,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    JobAccepted,
    JobState,
    LoraList,
    ModelList,
    WorkerList,
)

STATIC_DIR = Path(__file__).parent / "static"
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")


@dataclass(frozen=True)
class Reply:
    """One documented response: a JSON model, or other media types described in words."""

    description: str
    model: type[BaseModel] | None = None
    media_types: tuple[str, ...] = ("application/json",)
    one_of: tuple[type[BaseModel], ...] = ()  # for event streams: the models of the events' data


@dataclass(frozen=True)
class Route:
    """A route as registered and as documented."""

    method: str
    path: str
    handler: Handler
    summary: str
    body: type[BaseModel] | None = None
    replies: Mapping[int, Reply] = field(default_factory=dict)
    errors: Mapping[int, str] = field(default_factory=dict)
    error_model: type[BaseModel] = ErrorResponse
    headers: Mapping[str, str] = field(default_factory=dict)  # request headers the route reads
    tag: str = "jobs"
    access: Access = OPEN  # API key and rate limit (gateway/limits.py)


_GUARDED = {
    401: "an API key is needed (keys are configured) and none or an unknown one was sent",
    403: "the API key has been revoked",
    429: "over the caller's rate limit (`rate_limited`) or, for a submit, the queue is full (`queue_full`) or "
    "the caller has its cap of jobs in flight (`too_many_jobs_in_flight`); for an event stream, the caller "
    "has its cap of open streams (`too_many_event_streams`); for a route that waits for the result, the caller "
    "has its cap of waiting requests (`too_many_waiting_requests`): see Retry-After",
    503: "the queue is unreachable (see Retry-After)",
}
_BAD = {
    400: "invalid body: the error names the field and the rule",
    415: "the body is not application/json (or, where the route takes images, multipart/form-data)",
    413: "the body is over the limit (64 KiB by default; 64 MiB where the route takes input images)",
}
_SUBMIT_ERRORS = {
    **_GUARDED,
    **_BAD,
    422: f"{IDEMPOTENCY_HEADER} reused with a different request",
    503: "no worker is serving yet, the queue is unreachable, or (with --durable-accept) no replica confirmed "
    f"the job in time (`not_durable`: retry with the same {IDEMPOTENCY_HEADER}); see Retry-After",
}
# The OpenAI routes answer and wait: a job cancelled, failed or not finished in time is their error too.
_OPENAI_ERRORS = {
    **_SUBMIT_ERRORS,
    409: "the job was cancelled",
    500: "the generation failed",
    504: "not finished in time (the message has the job's URL; do not retry without an Idempotency-Key)",
}
_UNKNOWN = {**_GUARDED, 404: "unknown job (never submitted, its result expired, or another caller's)"}
SUBMIT, READ = Access("submit"), Access("read")
DEMO_SUBMIT, DEMO_READ = Access("submit", public=True), Access("read", public=True)
# The submitting routes take input images, so their bodies may be up to --max-image-body-bytes.
IMAGE_SUBMIT, DEMO_IMAGE_SUBMIT = Access("submit", images=True), Access("submit", public=True, images=True)
IMAGE_READ = Access("read", public=True, signed=True)  # a signed image URL needs no key
_IDEMPOTENCY = {
    IDEMPOTENCY_HEADER: "a client-chosen key (1..255 printable ASCII): a retry with the same key and "
    "body refers to the first job instead of creating another"
}

ROUTES: tuple[Route, ...] = (
    Route(
        "POST",
        "/v1/jobs",
        views.submit_job,
        "Queue a generation; answers at once with where to follow it",
        body=GenerateRequest,
        replies={202: Reply("queued (or, for a replayed Idempotency-Key, the existing job)", JobAccepted)},
        errors=_SUBMIT_ERRORS,
        headers=_IDEMPOTENCY,
        access=DEMO_IMAGE_SUBMIT,
    ),
    Route(
        "GET",
        "/v1/jobs/{job_id}",
        views.job_status,
        "A job's status, queue position, progress and result",
        replies={200: Reply("the job's state", JobState)},
        errors=_UNKNOWN,
        access=DEMO_READ,
    ),
    Route(
        "DELETE",
        "/v1/jobs/{job_id}",
        views.cancel_job,
        "Cancel a job: a queued job never runs; a running job's result is discarded",
        replies={200: Reply("cancelled (again: cancelling twice is harmless)", JobState)},
        errors={**_UNKNOWN, 409: "the job already succeeded or failed"},
        access=DEMO_READ,
    ),
    Route(
        "GET",
        "/v1/jobs/{job_id}/events",
        events.job_events,
        "Server-sent events: queued (position), started, progress per step, then succeeded, failed or cancelled "
        "(or closed, when the caller's key was revoked meanwhile)",
        replies={
            200: Reply(
                "an event stream; each event's name is its type and its data one of these objects",
                media_types=("text/event-stream",),
                one_of=tuple(JOB_EVENTS.values()),
            )
        },
        errors=_UNKNOWN,
        access=DEMO_READ,
    ),
    Route(
        "GET",
        "/v1/jobs/{job_id}/images/{index}",
        views.job_image,
        "One image of a succeeded job",
        replies={
            200: Reply("the image, in the job's output format", media_types=IMAGE_TYPES),
            307: Reply(
                "with --image-urls presigned: to a pre-signed URL of the image in the object store", media_types=()
            ),
        },
        errors={
            **_GUARDED,
            403: "the API key has been revoked, or a signed URL (`?expires=...&sig=...`, as the OpenAI route gives "
            "out) does not match or has expired (`invalid_signature`)",
            404: "unknown job (or another caller's) or image index",
            409: "the job has not succeeded (yet)",
            503: "the queue or the image store is unreachable (see Retry-After)",
        },
        access=IMAGE_READ,
    ),
    Route(
        "POST",
        "/v1/generate",
        views.generate,
        "Generate and wait: the images, base64-encoded, in the answer",
        body=GenerateRequest,
        replies={200: Reply("the images and timings", GenerateResponse)},
        errors={
            **_SUBMIT_ERRORS,
            409: "the job was cancelled",
            500: "the generation failed",
            504: "not finished in time: the body has the job id and status_url to collect it later",
        },
        headers=_IDEMPOTENCY,
        access=IMAGE_SUBMIT,
    ),
    Route(
        "POST",
        "/v1/images/generations",
        openai_api.images_generations,
        "OpenAI Images API: create images from a prompt",
        body=openai_api.ImageGenerationRequest,
        replies={200: Reply("the images", openai_api.ImagesResponse)},
        errors=_OPENAI_ERRORS,
        error_model=openai_api.OpenAIErrorResponse,
        tag="openai",
        access=SUBMIT,
    ),
    Route(
        "POST",
        "/v1/images/edits",
        openai_api.images_edits,
        "OpenAI Images API: edit an image (multipart: the file parts image and mask, the other fields as form fields)",
        body=openai_api.ImageEditRequest,
        replies={200: Reply("the images", openai_api.ImagesResponse)},
        errors=_OPENAI_ERRORS,
        error_model=openai_api.OpenAIErrorResponse,
        tag="openai",
        access=IMAGE_SUBMIT,
    ),
    Route(
        "GET",
        "/v1/models",
        views.list_models,
        "The models served (OpenAI's model list), with the sizes, step range and schedulers requests may ask for",
        replies={200: Reply("one entry per model that ready workers serve; empty while none is", ModelList)},
        errors=_GUARDED,
        access=DEMO_READ,
    ),
    Route(
        "GET",
        "/v1/loras",
        views.list_loras,
        "The LoRA adapters a request may name in `loras`: which serving workers offer each, how many hold it loaded",
        replies={200: Reply("one entry per adapter that ready workers offer; empty while none is", LoraList)},
        errors=_GUARDED,
        access=DEMO_READ,
    ),
    Route(
        "GET",
        "/v1/workers",
        views.list_workers,
        "The registered workers, their devices, sizes, step ranges, schedulers and state",
        replies={200: Reply("every worker whose heartbeat is current", WorkerList)},
        errors=_GUARDED,
        tag="operations",
        access=READ,
    ),
    Route(
        "GET",
        "/healthz",
        views.healthz,
        "Liveness: the process answers",
        replies={200: Reply("alive")},
        tag="operations",
    ),
    Route(
        "GET",
        "/readyz",
        views.readyz,
        "Readiness: Redis reachable and at least one worker ready",
        replies={200: Reply("ready")},
        errors={503: "not ready: the error says why"},
        tag="operations",
    ),
    Route(
        "GET",
        "/metrics",
        views.metrics,
        "Prometheus metrics",
        replies={200: Reply("Prometheus text exposition", media_types=("text/plain",))},
        tag="operations",
    ),
    Route(
        "GET", "/openapi.json", views.openapi, "This description", replies={200: Reply("OpenAPI 3.1")}, tag="operations"
    ),
    Route(
        "GET", "/", views.index, "The demo page", replies={200: Reply("HTML", media_types=("text/html",))}, tag="demo"
    ),
)


def setup_routes(app: web.Application) -> None:
    for route in ROUTES:
        app.router.add_route(route.method, route.path, route.handler)
    app.router.add_static("/static/", STATIC_DIR, name="static")
