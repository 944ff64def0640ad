"""`POST /v1/images/generations` and `POST /v1/images/edits`: OpenAI's Images API over the job queue.

An OpenAI request becomes a `GenerateRequest` and takes the same path as `/v1/generate` (size, steps and
scheduler checks, `Idempotency-Key`, request timeout), so the two routes cannot drift apart. Errors are raised as
`ApiError` naming the OpenAI parameter; the error middleware renders them in OpenAI's shape.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Collection
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import BaseModel, BeforeValidator, Field, StrictBool, ValidationError, ValidationInfo, field_validator
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from common.inputs import Inputs
from common.jobstore import StoredResult
from common.protocol import GenerationParams, OutputFormat, Size, nearest_sdxl_resolution, request_kind
from common.registry import SERVING_STATES, WorkerInfo
from gateway import jobs
from gateway.errors import ApiError, from_validation_error
from gateway.inputs import Uploaded, read_request, store_uploaded
from gateway.proxies import public_origin
from gateway.schemas import GenerateRequest, WebhookRequest
from gateway.state import CONFIG, REGISTRY, URL_SIGNER
from gateway.views import parse_body

_SIZE_RE = re.compile(r"(\d{1,5})x(\d{1,5})")
# The sizes OpenAI's image models take (gpt-image-1, DALL-E 3, DALL-E 2).
OPENAI_SIZES = frozenset({(1024, 1024), (1536, 1024), (1024, 1536), (1792, 1024), (1024, 1792), (256, 256), (512, 512)})
OPENAI_MAX_N = 10  # OpenAI's own bound; the workers' images per request, maybe fewer, is checked per request
OPENAI_DEFAULT_N = 1
# Our GenerateRequest fields that have another name in OpenAI's API.
_OPENAI_PARAMS = {"width": "size", "height": "size", "quality": "output_compression"}

_FORMATS: dict[str, OutputFormat] = {"image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp"}

OpenAIQuality = Literal["auto", "standard", "hd", "low", "medium", "high", "xhigh", "max"]


def _not_taken(value: Any) -> None:
    raise PydanticCustomError("extra_forbidden", "Extra inputs are not permitted")


# One of our generation parameters that OpenAI's API names otherwise (width and height are its `size`): refused
# under our name, as an unknown field is, and left out of the OpenAPI document.
_OursNamedOtherwise = SkipJsonSchema[Annotated[None, BeforeValidator(_not_taken)]]


class ImageGenerationRequest(GenerationParams):
    """OpenAI's `images.generate` body: this service's generation parameters (common/protocol.py; those OpenAI
    lacks are extensions), the size as OpenAI's `size`, and OpenAI's own fields.

    `model`, `user`, `quality`, `style`, `moderation`, `background` (but transparent), `partial_images`,
    `complexity` and `safety_identifier` are accepted for compatibility and ignored: a cluster serves one
    model, at the quality its compiled shapes give. `model` does choose the default `response_format`, as at
    OpenAI. A null value means the parameter was omitted.
    """

    width: _OursNamedOtherwise = None
    height: _OursNamedOtherwise = None
    n: int | None = Field(
        default=OPENAI_DEFAULT_N,
        ge=1,
        le=OPENAI_MAX_N,
        description="images to make and return, at most the images a worker makes per request",
    )
    size: str | None = Field(
        default=None,
        examples=["1024x1024"],
        description="WIDTHxHEIGHT in pixels; omitted or `auto`: the cluster's default size. OpenAI's sizes "
        "(1024x1024, 1536x1024, 1024x1536, 1792x1024, 1024x1792, 512x512, 256x256) are served as asked where a "
        "worker serves them, else as the SDXL trained resolution of the nearest aspect ratio; the response says "
        "which",
    )
    response_format: Literal["url", "b64_json"] | None = Field(
        default=None,
        description="`url`: absolute URLs, fetched without a key until they expire (signed); `b64_json`: inline. "
        "Omitted: `b64_json` for a gpt-image model, `url` for any other, as at OpenAI",
    )
    model: str | None = Field(
        default=None, description="a cluster serves one model; a gpt-image name makes `b64_json` the default"
    )
    user: str | None = Field(default=None, description="accepted and ignored (never logged)")
    safety_identifier: str | None = Field(default=None, description="accepted and ignored (never logged)")
    quality: OpenAIQuality | None = Field(default=None, description="accepted and ignored")
    style: Literal["vivid", "natural"] | None = Field(default=None, description="accepted and ignored")
    moderation: Literal["low", "auto"] | None = Field(default=None, description="accepted and ignored")
    background: Literal["opaque", "auto"] | None = Field(
        default=None, description="accepted and ignored: images are opaque (`transparent` is refused)"
    )
    complexity: Literal["low", "medium", "high"] | None = Field(default=None, description="accepted and ignored")
    partial_images: int | None = Field(default=None, ge=0, le=3, description="accepted and ignored (no streaming)")
    # StrictBool: a Literal[False] would take 0, which equals False.
    stream: StrictBool | None = Field(default=None, description="streaming is not supported: false or omitted")
    output_format: OutputFormat | None = "png"
    output_compression: int | None = Field(
        default=None, ge=0, le=100, description="JPEG/WebP quality, 0..100 (default 90); not for png"
    )
    webhook: WebhookRequest | None = Field(default=None, description="an extension: as on POST /v1/jobs")

    @field_validator("size")
    @classmethod
    def _size_is_width_x_height(cls, value: str | None) -> str | None:
        if value is not None and value != "auto" and _SIZE_RE.fullmatch(value) is None:
            raise ValueError("size must be WIDTHxHEIGHT in pixels, e.g. 1024x1024, or auto")
        return value

    @field_validator("stream", mode="before")
    @classmethod
    def _no_streaming(cls, value: Any) -> Any:
        if value is True:
            raise PydanticCustomError(
                "not_supported", "streaming is not supported: leave stream out (or false) and wait for the answer"
            )
        return value

    @field_validator("background", mode="before")
    @classmethod
    def _no_transparency(cls, value: Any) -> Any:
        if value == "transparent":
            raise PydanticCustomError("not_supported", "transparent backgrounds are not supported: opaque or auto")
        return value

    @field_validator("output_compression")
    @classmethod
    def _compression_needs_lossy_format(cls, value: int | None, info: ValidationInfo) -> int | None:
        # output_format is declared first, so it is validated (and in info.data) by now, when valid.
        if value is not None and (info.data.get("output_format") or "png") == "png":
            raise ValueError("output_compression applies to jpeg and webp only; png is lossless")
        return value

    def dimensions(self, served: Collection[tuple[int, int]] = ()) -> tuple[int, int] | None:
        """The (width, height) to generate, or None for the cluster's default size. One of OpenAI's own sizes
        that no worker serves (`served`) becomes the SDXL trained resolution of the nearest aspect ratio
        (1536x1024 -> 1216x832); any other size is taken as asked."""
        match = _SIZE_RE.fullmatch(self.size or "")
        if match is None:
            return None
        size = int(match[1]), int(match[2])
        return nearest_sdxl_resolution(*size) if size in OPENAI_SIZES and size not in served else size

    def images_format(self) -> Literal["url", "b64_json"]:
        """The response format: as asked, else OpenAI's default for the model (gpt-image models answer inline)."""
        if self.response_format is not None:
            return self.response_format
        return "b64_json" if (self.model or "").startswith("gpt-image") else "url"


class ImageEditRequest(ImageGenerationRequest):
    """OpenAI's `images.edit` form (multipart): the fields of `images.generate`, with the image to edit and an optional
    mask as file parts `image` and `mask` (gateway/inputs.py); `input_fidelity` is accepted and ignored. As an
    extension, a JSON body may carry them base64, as on `POST /v1/jobs`."""

    input_fidelity: Literal["high", "low"] | None = Field(default=None, description="accepted and ignored")
    size: str | None = Field(
        default=None,
        examples=["1024x1024"],
        description="WIDTHxHEIGHT in pixels; omitted or `auto`: the input image's size where a live worker serves "
        "it (and runs the edit), else the cluster's default size; otherwise as on /v1/images/generations",
    )
    image: str | None = Field(default=None, description="the image to edit: a file part (base64 in a JSON body)")
    mask: str | None = Field(default=None, description="white is repainted: a file part (base64 in a JSON body)")


class ImageData(BaseModel):
    """One image: inline or by URL, as the request's `response_format` asked."""

    b64_json: str | None = Field(default=None, description="the image, base64-encoded")
    url: str | None = Field(default=None, description="where to GET the image, while the job's result is kept")
    nsfw: bool | None = Field(
        default=None, description="whether the safety checker flagged the image (then replaced); absent without one"
    )


class ImagesResponse(BaseModel):
    """OpenAI's Images API response."""

    created: int = Field(description="Unix time, in seconds, of the answer")
    data: list[ImageData]
    output_format: OutputFormat
    size: str = Field(description="WIDTHxHEIGHT of the images")


class OpenAIError(BaseModel):
    """What went wrong, in OpenAI's words: `param` names the request parameter at fault, if one is."""

    message: str
    type: str = Field(examples=["invalid_request_error", "server_error"])
    param: str | None = None
    code: str | None = None


class OpenAIErrorResponse(BaseModel):
    """Every error body on the OpenAI-compatible routes."""

    error: OpenAIError


async def images_generations(request: web.Request) -> web.Response:
    """Generate images for an OpenAI Images API request, waiting for them as `/v1/generate` does."""
    return await _answer(request, await parse_body(request, ImageGenerationRequest), Uploaded())


async def images_edits(request: web.Request) -> web.Response:
    """Edit an image (image-to-image; with a mask, inpainting) for an OpenAI Images API request: as
    `images_generations`, from the uploaded image."""
    body, uploaded = await read_request(request, ImageEditRequest)
    if uploaded.image is None:
        raise ApiError(400, "missing", "image: the image to edit is required (a file part named image)", field="image")
    return await _answer(request, body, uploaded, transparent_mask=True)


async def _answer(
    request: web.Request, body: ImageGenerationRequest, uploaded: Uploaded, *, transparent_mask: bool = False
) -> web.Response:
    """Queue the request's job (from its input images, if any) and answer with its images. `transparent_mask`: an
    edit's mask repaints where it is fully transparent, as OpenAI's does."""
    decoded = await uploaded.decoded(request.app[CONFIG].input_limits, transparent_mask=transparent_mask)
    workers = await request.app[REGISTRY].workers()
    served = {(s.width, s.height) for w in workers for s in w.sizes}
    generate = to_generate_request(body, served, _input_size(decoded, workers))
    try:
        placed = await jobs.make_job(request, generate, workers, default_n=OPENAI_DEFAULT_N, inputs=decoded)
    except ApiError as exc:
        raise _renamed(exc) from None
    placed = await store_uploaded(request, placed, decoded, uploaded)
    try:
        stored = await jobs.submit_and_wait(request, generate, placed)
    except ApiError as exc:
        raise _with_status_url(request, exc) from None
    jobs.raise_unless_succeeded(stored)
    answer = _images_response(request, stored, body.images_format(), placed.job.params.n)
    return web.Response(
        body=answer.model_dump_json(exclude_none=True),
        content_type="application/json",
        headers=jobs.replay_headers(request),
    )


def to_generate_request(
    body: ImageGenerationRequest, served: Collection[tuple[int, int]] = (), unsized: tuple[int, int] | None = None
) -> GenerateRequest:
    """The native request for an OpenAI one, given the sizes the workers serve, at the (width, height) `unsized` when
    it names no size (None: the cluster's default); a size our limits refuse is a 400 naming `size`."""
    width, height = body.dimensions(served) or unsized or (None, None)
    # Our quality starts at 1; OpenAI's output_compression at 0, which asks for the smallest file anyway.
    quality = max(1, body.output_compression) if body.output_compression is not None else None
    # Every generation parameter is taken as it is, but the size, which is OpenAI's `size` here.
    params = {name: getattr(body, name) for name in GenerationParams.model_fields}
    # An `n` the client did not name stays unnamed (the route's default, 1, is applied to the job), so that the
    # request's Idempotency-Key fingerprint is the one it had before requests had `n`.
    params["n"] = body.n if "n" in body.model_fields_set else None
    try:
        return GenerateRequest(
            **(params | {"width": width, "height": height}),
            output_format=body.output_format or "png",
            quality=quality,
            webhook=body.webhook,
        )
    except ValidationError as exc:
        raise _renamed(from_validation_error(exc)) from None


def _input_size(inputs: Inputs | None, workers: list[WorkerInfo]) -> tuple[int, int] | None:
    """The (width, height) of an edit's input image when a live worker serves that size for the edit's kind, as
    OpenAI's edits answer at the input's size by default; None (the cluster's default size) otherwise."""
    if inputs is None:
        return None
    height, width = inputs.image.shape[:2]
    size, kind = Size(width=width, height=height), request_kind(True, inputs.mask is not None)
    live = (w for w in workers if w.state in SERVING_STATES and kind in w.request_kinds)
    return (width, height) if any(size in w.sizes for w in live) else None


def _renamed(error: ApiError) -> ApiError:
    """The same error naming the OpenAI parameter instead of our field (width -> size, ...)."""
    param = _OPENAI_PARAMS.get(error.field or "")
    if param is None:
        return error
    return ApiError(error.status, error.code, error.message, field=param, headers=error.headers, **error.extra)


def _with_status_url(request: web.Request, error: ApiError) -> ApiError:
    """OpenAI's error shape has no room for our extras: a 504's job URL goes into the message.

    The job is still queued or running, so the OpenAI client must not retry (its default for a 5xx):
    each retry would queue another job. `x-should-retry: false` is the header it honours.
    """
    status_url = error.extra.get("status_url")
    if not isinstance(status_url, str):
        return error
    message = f"{error.message}: {_absolute(request, status_url)}"
    return ApiError(
        error.status,
        error.code,
        message,
        field=error.field,
        headers={**error.headers, "x-should-retry": "false"},
        **error.extra,
    )


def _images_response(request: web.Request, stored: StoredResult, response_format: str, n: int) -> ImagesResponse:
    """The job's images: it was made with `n` (a worker from before requests had `n` made its full batch, of
    which the first `n` are answered)."""
    result = stored.result
    assert result.shape is not None
    flags: list[bool | None] = list(result.nsfw) if result.nsfw is not None else [None] * result.image_count
    if response_format == "b64_json":
        data = [
            ImageData(b64_json=base64.b64encode(image).decode("ascii"), nsfw=flag)
            for image, flag in zip(stored.images[:n], flags, strict=False)
        ]
    else:
        count = min(n, result.image_count)
        sign, owner = request.app[URL_SIGNER].sign, jobs.submitter(request).owner
        data = [
            ImageData(url=_absolute(request, sign(jobs.image_url(result.id, k), owner)), nsfw=flags[k])
            for k in range(count)
        ]
    return ImagesResponse(
        created=int(time.time()),
        data=data,
        output_format=_output_format(result.media_type),
        size=f"{result.shape.width}x{result.shape.height}",
    )


def _output_format(media_type: str) -> OutputFormat:
    return _FORMATS.get(media_type, "png")


def _absolute(request: web.Request, path: str) -> str:
    """`path` (with its query) as an absolute URL: OpenAI clients fetch image URLs as they are, with no base URL
    to resolve a relative one against. The base is `--public-url`, else the origin the client reached, as the
    trusted proxies in front of the gateway report it."""
    config = request.app[CONFIG]
    base = config.webhooks.public_url or public_origin(request, config.trusted_proxies)
    return base.rstrip("/") + path
