"""Schemas of the HTTP API: request and response bodies, errors, and the events of a job's event stream.

Only the gateway speaks HTTP; what the gateway and the worker exchange through Redis (the queued Job, the
stored JobResult, the field rules both validate) is common/protocol.py. The OpenAPI document is built
from these models.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from common.protocol import GenerationParams, JobStatus, OutputFormat, Timings
from common.registry import WorkerInfo


class WebhookRequest(BaseModel):
    """Where to POST a job's events, signed per Standard Webhooks: `completed` (the job ended: succeeded, failed
    or cancelled), `started`, `progress`. The URL is checked at submit: https (unless the operator allows http),
    a host that resolves to public addresses only (unless the operator allows it)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    url: str = Field(min_length=1, max_length=2048)
    events: list[Literal["completed", "started", "progress"]] = Field(default=["completed"], min_length=1, max_length=3)

    @model_validator(mode="before")
    @classmethod
    def _an_object(cls, value: Any) -> Any:
        # Other services take a bare URL here; say what this one takes rather than "must be an object".
        if isinstance(value, str):
            raise PydanticCustomError(
                "model_type",
                'takes an object with url (and optionally events), e.g. {"url": "https://...", '
                '"events": ["completed"]}, not a string',
            )
        return value


class GenerateRequest(GenerationParams):
    """Body of `POST /v1/generate` and `POST /v1/jobs`: the generation parameters, then how to deliver the
    images. Omitted size, steps and scheduler take the cluster's defaults; what the workers serve is listed by
    `GET /v1/models`."""

    output_format: OutputFormat = "png"
    quality: int | None = Field(
        default=None, ge=1, le=100, description="JPEG/WebP quality, 1..100 (default 90); not for png"
    )
    webhook: WebhookRequest | None = None
    # Input images, base64 in a JSON body (a multipart body sends them as files: gateway/inputs.py). They are
    # decoded, checked and stored by the gateway; the job carries only where they are (common/inputs.py).
    image: str | None = Field(
        default=None,
        description="an input image (PNG, JPEG or WebP), base64 (a data: URL prefix is accepted), for "
        "image-to-image; with `mask`, inpainting. Needs a worker that runs the kind (WorkerInfo.request_kinds)",
    )
    mask: str | None = Field(
        default=None,
        description="an inpainting mask, base64, the image's size: white (>= 50% grey) is repainted, black kept",
    )

    @field_validator("quality")
    @classmethod
    def _quality_needs_lossy_format(cls, value: int | None, info: ValidationInfo) -> int | None:
        # output_format is declared first, so it is validated (and in info.data) by now, when valid.
        if value is not None and info.data.get("output_format", "png") == "png":
            raise ValueError("quality applies to jpeg and webp only; png is lossless")
        return value


class ResponseTimings(Timings):
    """Timings as returned over HTTP, with the gateway's end-to-end figure (None when fetched later)."""

    total_ms: float | None


class GenerateResponse(BaseModel):
    """Body of a successful `POST /v1/generate`."""

    id: str
    seed: int
    width: int
    height: int
    num_inference_steps: int
    scheduler: str
    images: list[str]
    worker: str
    timings: ResponseTimings
    nsfw: list[bool] | None = Field(
        default=None,
        description="per image, whether the safety checker flagged it (it was then replaced); null without a checker",
    )


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    """Every error body: what went wrong, the rule's code and, when one field is at fault, its name."""

    error: ErrorDetail


class JobAccepted(BaseModel):
    """Body of `202 POST /v1/jobs`: where to follow the job."""

    id: str
    status: JobStatus
    status_url: str
    events_url: str


class Progress(BaseModel):
    """Denoising steps done so far, of `total`."""

    step: int = Field(ge=0)
    total: int = Field(ge=1)


class JobOutput(BaseModel):
    """A succeeded job's result; each image is fetched from its URL (`GET /v1/jobs/{id}/images/{k}`)."""

    seed: int
    width: int
    height: int
    num_inference_steps: int
    scheduler: str = Field(description="the sampler that ran")
    worker: str
    media_type: str
    images: list[str] = Field(description="URL of each image, in order")
    timings: ResponseTimings
    nsfw: list[bool] | None = Field(
        default=None,
        description="per image, whether the safety checker flagged it (it was then replaced); null without a checker",
    )


class WebhookDelivery(BaseModel):
    """One event of a job's webhook: its `webhook-id`, attempts so far and how the last one went (times in
    Unix seconds)."""

    id: str
    event: str
    attempts: int
    last_status: int | None = Field(default=None, description="the receiver's HTTP status (none: no answer)")
    last_error: str | None = None
    last_attempt_at: float | None = None
    next_attempt_at: float | None = Field(default=None, description="when it is tried again; while retried")
    delivered_at: float | None = None
    gave_up_at: float | None = None


class WebhookState(BaseModel):
    """A job's webhook and its deliveries (none before its first event)."""

    url: str
    events: list[str]
    deliveries: list[WebhookDelivery]


class JobState(BaseModel):
    """Body of `GET /v1/jobs/{id}`: where a job is, and its result or error once it has one."""

    id: str
    status: JobStatus
    queue_position: int | None = Field(default=None, description="jobs ahead of this one (0: next); while queued")
    worker: str | None = None
    progress: Progress | None = None
    result: JobOutput | None = None
    error: ErrorDetail | None = None
    webhook: WebhookState | None = None


class QueuedEvent(BaseModel):
    """SSE `queued`: sent first for a queued job, then whenever its position changes."""

    id: str
    position: int = Field(description="jobs ahead of this one (0: next)")


class StartedEvent(BaseModel):
    """SSE `started`: a worker took the job (again, with another worker, if the first one died)."""

    id: str
    worker: str


class ProgressEvent(BaseModel):
    """SSE `progress`: denoising step `step` of `total` is done; sent for every step, in order."""

    id: str
    step: int
    total: int


class SucceededEvent(BaseModel):
    """SSE `succeeded`, the last event: the result, with each image's URL."""

    id: str
    result: JobOutput


class FailedEvent(BaseModel):
    """SSE `failed`, the last event."""

    id: str
    error: ErrorDetail


class CancelledEvent(BaseModel):
    """SSE `cancelled`, the last event."""

    id: str


class ClosedEvent(BaseModel):
    """SSE `closed`, the last event of a stream the gateway ended before the job did: `reason`
    `api_key_revoked` when the caller's key was revoked meanwhile."""

    id: str
    reason: str


JOB_EVENTS: dict[str, type[BaseModel]] = {
    "queued": QueuedEvent,
    "started": StartedEvent,
    "progress": ProgressEvent,
    "succeeded": SucceededEvent,
    "failed": FailedEvent,
    "cancelled": CancelledEvent,
    "closed": ClosedEvent,
}


class WorkerList(BaseModel):
    """Body of `GET /v1/workers`: every registered worker, and how many of them are serving."""

    workers: list[WorkerInfo]
    serving: int


class ModelCard(BaseModel):
    """A model the serving workers run (OpenAI's model object), with what they serve: these sizes, any step
    count from 1 to `max_steps`, these schedulers."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time, in seconds, when the first of its serving workers was ready")
    owned_by: str = "sdxl-serve"
    sizes: list[str] = Field(description="WIDTHxHEIGHT; the first is the default")
    min_steps: int = 1
    max_steps: int
    default_steps: int
    schedulers: list[str] = Field(description="the first is the default")
    random_weights: bool = Field(
        default=False, description="the tiny random-weight test model (`sdxl-serve tiny-model`): its images are noise"
    )


class ModelList(BaseModel):
    """Body of `GET /v1/models`: the models that ready or busy workers serve."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class LoraCard(BaseModel):
    """A LoRA adapter the serving workers offer: a request names it in `loras` by this `id`."""

    id: str
    object: Literal["lora"] = "lora"
    owned_by: str = "sdxl-serve"
    workers: list[str] = Field(description="the serving workers that offer it (a request naming it runs on one)")
    loaded: int = Field(description="how many of them hold it in their device pool now (no load before its first step)")


class LoraList(BaseModel):
    """Body of `GET /v1/loras`: the adapters that ready or busy workers offer, by name."""

    object: Literal["list"] = "list"
    data: list[LoraCard]
    max_loras: int = Field(
        default=0, description="the most adapters one request may name: the largest `max_loras` of the serving workers"
    )
