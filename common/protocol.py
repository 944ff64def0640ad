"""The wire protocol between gateway and worker: a request's generation parameters, the queued job, the stored
result, and the field rules.

Everything is validated with pydantic on the way in, at the gateway and again at the worker: the worker
never trusts what it reads from the queue. `GenerationParams` is defined once, here: the HTTP request bodies
(gateway/schemas.py, gateway/openai_api.py) take its fields as they are, the job carries it whole, and the
worker hands it whole to the pipeline, so a new field is declared in one place and read where it is used.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    model_serializer,
)
from pydantic_core import PydanticCustomError

MAX_SEED = 2**32 - 1
DEFAULT_GUIDANCE_SCALE = 7.5
# The protocol's own bounds: what any process accepts, and so what a worker re-validates a queued job
# against. A gateway may be configured tighter (RequestLimits), never looser.
MAX_PROMPT_CHARS = 2000
MIN_GUIDANCE, MAX_GUIDANCE = 0.0, 30.0
MAX_RESULT_TTL_S = 30 * 24 * 3600
# How long a result stays fetchable unless the gateway says otherwise (`--result-ttl`).
DEFAULT_RESULT_TTL_S = 3600
# Steps per request: the protocol's bound, and a worker's default maximum (`--max-steps`). A worker compiles
# each size once and serves any step count from 1 to its maximum.
MAX_STEPS = 200
DEFAULT_MAX_STEPS = 50
DEFAULT_STEPS = 20
# Images per request: what the job API and the demo make when a request names no `n`. A request may ask for 1 up to
# the most a worker advertises (`WorkerInfo.images_per_request`); each image is a row of the worker's batch.
DEFAULT_IMAGES = 4
MAX_IMAGES = 64
JOB_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
# LoRA adapters per request: the protocol's bound; a worker takes at most its own `max_loras` (WorkerInfo). An
# adapter is named as its file is, without the extension; a scale multiplies its low-rank update.
MAX_LORAS = 8
LORA_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
MIN_LORA_SCALE, MAX_LORA_SCALE = -4.0, 4.0
# How much of an input image is repainted (0 < strength <= 1): the share of the schedule's steps run from it. With an
# image and no strength, diffusers' own defaults (StableDiffusionXLImg2ImgPipeline, ...InpaintPipeline): 0.3 for
# image-to-image; 0.9999 for inpainting, which keeps a trace of the image under the mask where 1.0 would start it
# from pure noise.
DEFAULT_IMG2IMG_STRENGTH = 0.3
DEFAULT_INPAINT_STRENGTH = 0.9999
_SIZE_RE = re.compile(r"^\s*(\d+)x(\d+)\s*$")
_SHAPE_RE = re.compile(r"^\s*(\d+)x(\d+)x(\d+)\s*$")
# C0 controls and DEL, less tab, newline and carriage return: never part of a prompt, and a NUL or an
# escape sequence has no business in the logs or the tokenizer.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@dataclass(frozen=True)
class RequestLimits:
    """A gateway's bounds on request fields, within the protocol's own (checked at start).

    Validation reads them from the pydantic context (`model_validate_json(raw, context=limits.context())`);
    without a context the protocol's bounds apply, as they do for a worker re-validating a queued job.
    """

    max_prompt_chars: int = MAX_PROMPT_CHARS
    min_guidance: float = MIN_GUIDANCE
    max_guidance: float = MAX_GUIDANCE

    def context(self) -> dict[str, RequestLimits]:
        return {"limits": self}

    def schema_bounds(self) -> dict[str, dict[str, int | float]]:
        """The JSON Schema keywords these limits tighten, by field name: what a gateway's `/openapi.json` says."""
        prompt: dict[str, int | float] = {"maxLength": self.max_prompt_chars}
        guidance: dict[str, int | float] = {"minimum": self.min_guidance, "maximum": self.max_guidance}
        return {"prompt": prompt, "negative_prompt": prompt, "guidance_scale": guidance}


DEFAULT_LIMITS = RequestLimits()


class Size(BaseModel):
    """An image size a worker compiled its executables for; they serve every step count up to its maximum."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    width: int = Field(gt=0)
    height: int = Field(gt=0)

    @classmethod
    def parse(cls, text: str) -> Size:
        """Parse `WIDTHxHEIGHT`, for example `1024x1024`."""
        match = _SIZE_RE.match(text)
        if match is None:
            raise ValueError(f"size {text!r} is not WIDTHxHEIGHT, e.g. 1024x1024")
        return cls(width=int(match[1]), height=int(match[2]))

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


class Shape(BaseModel):
    """What one request runs: an image size and a step count."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    width: int = Field(gt=0)
    height: int = Field(gt=0)
    steps: int = Field(gt=0)

    @classmethod
    def parse(cls, text: str) -> Shape:
        """Parse `WIDTHxHEIGHTxSTEPS`, for example `1024x1024x20`."""
        match = _SHAPE_RE.match(text)
        if match is None:
            raise ValueError(f"shape {text!r} is not WIDTHxHEIGHTxSTEPS, e.g. 1024x1024x20")
        width, height, steps = (int(g) for g in match.groups())
        return cls(width=width, height=height, steps=steps)

    def __str__(self) -> str:
        return f"{self.width}x{self.height}x{self.steps}"

    @property
    def size(self) -> Size:
        return Size(width=self.width, height=self.height)


# The (width, height) SDXL base was trained at (the SDXL paper's aspect-ratio buckets near one megapixel).
SDXL_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (1024, 1024),
    (1152, 896),
    (896, 1152),
    (1216, 832),
    (832, 1216),
    (1344, 768),
    (768, 1344),
    (1536, 640),
    (640, 1536),
)


def nearest_sdxl_resolution(width: int, height: int) -> tuple[int, int]:
    """The trained resolution whose aspect ratio is closest to width:height (on a log scale, so 2:1 and
    1:2 are equally far from square)."""
    return min(SDXL_RESOLUTIONS, key=lambda size: abs(math.log((size[0] / size[1]) / (width / height))))


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("prompt must contain non-whitespace characters")
    return value


def _limits(info: ValidationInfo) -> RequestLimits:
    context = info.context
    limits = context.get("limits") if isinstance(context, dict) else None
    return limits if isinstance(limits, RequestLimits) else DEFAULT_LIMITS


def _prompt_rules(value: str, info: ValidationInfo) -> str:
    limit = _limits(info).max_prompt_chars
    if len(value) > limit:  # the same rule code pydantic uses for its own max_length
        raise PydanticCustomError(
            "string_too_long", "String should have at most {max_length} characters", {"max_length": limit}
        )
    if _CONTROL_RE.search(value):
        raise PydanticCustomError(
            "control_character", "control characters (other than tab and newline) are not allowed"
        )
    return value


def _guidance_range(value: float, info: ValidationInfo) -> float:
    limits = _limits(info)
    if value < limits.min_guidance:
        raise PydanticCustomError(
            "greater_than_equal", "Input should be greater than or equal to {ge}", {"ge": limits.min_guidance}
        )
    if value > limits.max_guidance:
        raise PydanticCustomError(
            "less_than_equal", "Input should be less than or equal to {le}", {"le": limits.max_guidance}
        )
    return value


# Field types shared by every request schema (native and OpenAI) and the queued job, so their rules cannot
# drift apart. The static bounds are the protocol's; a gateway's tighter ones come through the context.
Prompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS), AfterValidator(_prompt_rules)]
RequiredPrompt = Annotated[
    str, Field(min_length=1, max_length=MAX_PROMPT_CHARS), AfterValidator(_prompt_rules), AfterValidator(_not_blank)
]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
GuidanceScale = Annotated[
    float, Field(ge=MIN_GUIDANCE, le=MAX_GUIDANCE, allow_inf_nan=False), AfterValidator(_guidance_range)
]
InferenceSteps = Annotated[int, Field(ge=1, le=MAX_STEPS)]
ImageCount = Annotated[int, Field(ge=1, le=MAX_IMAGES)]
# The samplers a worker runs (worker/schedulers.py): each is a table of per-step coefficients computed on the
# host, so one compiled executable serves them all. Euler uses the model's own timestep spacing (SDXL base:
# "leading"); "trailing" spacing is what distilled checkpoints (Lightning, Turbo) are made for; DPM-Solver++
# (second-order multistep) with Karras sigmas reaches Euler's quality in fewer steps.
Scheduler = Literal["euler", "euler_trailing", "dpmpp_2m_karras"]
SCHEDULERS: tuple[str, ...] = get_args(Scheduler)
DEFAULT_SCHEDULER: Scheduler = "euler"
OutputFormat = Literal["png", "jpeg", "webp"]
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FINISHED: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
DEFAULT_QUALITY = 90  # JPEG and WebP, when the request names none


# What `X-Request-ID` may carry: an id from a proxy or a client, safe to log as it is.
REQUEST_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
RequestId = Annotated[str, Field(pattern=REQUEST_ID_PATTERN)]


# An image dimension a request may ask for; what a worker serves is checked against the live workers.
Dimension = Annotated[int, Field(ge=64, le=4096, multiple_of=8, description="a size the workers serve")]


class LoraRef(BaseModel):
    """One LoRA adapter a request applies (worker/lora.py): its name among those the workers offer, and the scale of
    its update (0: as if not named)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: str = Field(pattern=LORA_NAME_PATTERN, description="an adapter the workers offer (GET /v1/loras)")
    scale: float = Field(default=1.0, ge=MIN_LORA_SCALE, le=MAX_LORA_SCALE, allow_inf_nan=False)


def _distinct_names(loras: list[LoraRef]) -> list[LoraRef]:
    names = [lora.name for lora in loras]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise PydanticCustomError("lora_repeated", "adapter {name} is named twice", {"name": name})
    return loras


Loras = Annotated[list[LoraRef], Field(max_length=MAX_LORAS), AfterValidator(_distinct_names)]
Strength = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]


class GenerationParams(BaseModel):
    """A request's generation parameters, defined once: the HTTP request bodies take these fields as they are,
    the queued job carries them whole (as `ResolvedParams`) and the worker hands them whole to the pipeline.

    Size, steps, seed and scheduler may be omitted (None): the gateway then chooses them against the live
    workers (gateway/shapes.py). A new field is declared here, with its rules, and read where it is used.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: RequiredPrompt
    negative_prompt: Prompt = ""
    seed: Seed | None = None
    guidance_scale: GuidanceScale = DEFAULT_GUIDANCE_SCALE
    num_inference_steps: InferenceSteps | None = Field(
        default=None, description="1 up to the workers' max_steps for the size; omitted: their default"
    )
    width: Dimension | None = None
    height: Dimension | None = None
    scheduler: Scheduler | None = Field(default=None, description="the sampler; omitted: euler")
    n: ImageCount | None = Field(
        default=None, description="images to make, 1 up to the workers' images_per_request; omitted: 4"
    )
    loras: Loras = Field(
        default_factory=list, description="LoRA adapters to apply, each with its scale; up to the workers' max_loras"
    )
    strength: Strength | None = Field(
        default=None,
        description="with an input image only: how much of it is repainted, 0 < strength <= 1; omitted: 0.3 "
        "(image-to-image) or 0.9999 (inpainting, with a mask)",
    )

    def resolved(self, shape: Shape, seed: int, scheduler: Scheduler = DEFAULT_SCHEDULER) -> ResolvedParams:
        """These parameters (only these: not the fields of a request body built on them) with the cluster's
        choices for size, steps, seed and scheduler, and `n` (DEFAULT_IMAGES when omitted)."""
        fields = {name: getattr(self, name) for name in GenerationParams.model_fields}
        chosen = {"width": shape.width, "height": shape.height, "num_inference_steps": shape.steps}
        n = DEFAULT_IMAGES if self.n is None else self.n
        return ResolvedParams(**(fields | chosen | {"seed": seed, "scheduler": scheduler, "n": n}))


class ResolvedParams(GenerationParams):
    """Generation parameters with every choice made: what a job runs, as the pipeline receives it. The size is
    one a worker serves (any positive size: workers may be configured with sizes requests cannot name)."""

    seed: Seed
    num_inference_steps: InferenceSteps
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    scheduler: Scheduler
    n: ImageCount = DEFAULT_IMAGES  # a job queued before requests had `n` made the default batch

    @property
    def shape(self) -> Shape:
        """The size and step count, as workers and streams are keyed."""
        return Shape(width=self.width, height=self.height, steps=self.num_inference_steps)

    @model_serializer(mode="wrap")
    def _unused_left_out(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # A text-to-image job is written as before `strength` existed, so a worker of an earlier release (which
        # refuses unknown fields) still takes it while a cluster is upgraded.
        return _without_none(handler(self), "strength")


def default_strength(masked: bool) -> float:
    """The strength of a request with an input image that names none: diffusers' default for its pipeline."""
    return DEFAULT_INPAINT_STRENGTH if masked else DEFAULT_IMG2IMG_STRENGTH


# What a request asks of the model, by its inputs: no image, an image, an image and a mask. A worker advertises the
# kinds it runs (WorkerInfo.request_kinds): SDXL base runs all three (from images only where its engine takes them),
# an inpainting model (a 9-channel UNet) inpainting only.
RequestKind = Literal["text-to-image", "image-to-image", "inpainting"]
REQUEST_KINDS: tuple[RequestKind, ...] = get_args(RequestKind)
IMAGE_KINDS: frozenset[RequestKind] = frozenset({"image-to-image", "inpainting"})


def request_kind(image: bool, mask: bool) -> RequestKind:
    """The kind of a request with an input image (`image`) and an inpainting mask (`mask`), or neither."""
    if not image:
        return "text-to-image"
    return "inpainting" if mask else "image-to-image"


class InputRefs(BaseModel):
    """Where a job's input images are stored (never in the stream: common/inputs.py writes and reads them): the
    image's key, the inpainting mask's (None: image-to-image), and the image's size as the gateway decoded it.
    `store` says where the keys live: the blob store, or Redis (a gateway without one)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    store: Literal["blob", "redis"]
    image: str = Field(min_length=1, max_length=512)
    mask: str | None = Field(default=None, min_length=1, max_length=512)
    width: int = Field(gt=0)
    height: int = Field(gt=0)


class Job(BaseModel):
    """A fully resolved request as it travels through the queue: what to generate and how to deliver it."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=JOB_ID_PATTERN)
    params: ResolvedParams
    output_format: OutputFormat = "png"
    quality: int = Field(default=DEFAULT_QUALITY, ge=1, le=100)
    result_ttl_s: int = Field(gt=0, le=MAX_RESULT_TTL_S)
    # The HTTP request that made the job, so the worker's log lines can be found by it.
    request_id: RequestId | None = None
    # The job's webhook (common/webhooks.py WebhookSpec, JSON), opaque to the worker: its result carries it
    # back into a job record that Redis lost, so the `completed` webhook is still due.
    webhook: str | None = Field(default=None, max_length=4096)
    # The request's input images (image-to-image, inpainting), stored beside the job; None: text-to-image.
    inputs: InputRefs | None = None

    @model_serializer(mode="wrap")
    def _unused_left_out(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # As ResolvedParams: a job without input images is written as before they existed.
        return _without_none(handler(self), "inputs")


def _without_none(data: dict[str, Any], name: str) -> dict[str, Any]:
    """`data` without the field `name` when it is None (it is then left to its default when read back)."""
    if data.get(name, 0) is None:
        del data[name]
    return data


class Timings(BaseModel):
    """Where a job's time went, in milliseconds. `queued_ms` is measured on the Redis server's clock."""

    queued_ms: float
    generate_ms: float
    encode_ms: float


class JobResult(BaseModel):
    """What a worker stores for a job: success with images (stored beside it), or failure with a reason."""

    id: str
    status: Literal["succeeded", "failed", "cancelled"]
    worker: str | None = None  # None when cancelled before any worker ran it
    # What ran: None for a job no worker ran (cancelled while queued, malformed).
    seed: int | None = None
    shape: Shape | None = None
    scheduler: str | None = None
    media_type: str = "image/png"
    image_count: int = 0
    timings: Timings | None = None
    error: str | None = None
    # With a blob store (common/blobstore.py) the images are objects and the result holds only where they are
    # and how large: None means they are in the result's Redis hash.
    image_keys: list[str] | None = None
    image_sizes: list[int] | None = None
    # Per image, whether the safety checker flagged it (and it was replaced); None: no checker ran.
    nsfw: list[bool] | None = None
