"""Reading a request that may carry input images: a JSON body (`image` and `mask` as base64, a data-URL prefix
tolerated) or `multipart/form-data` (file parts `image` and `mask`, every other field a form field converted by the
same rules as its JSON value). The images are decoded and checked here (common/input_images.py): any refusal is a
400 naming the field and the rule, before anything is stored or queued.

Limits: the body is bounded by its route's limit (`--max-body-bytes`, or `--max-image-body-bytes` on a route that
takes images), counted as it is read, so a body without a Content-Length is cut off too (413); each image part by
the input limit on an image's bytes (a 400 naming it); the form fields together by `--max-body-bytes`. Image bytes
are never logged, nor echoed in an error.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import functools
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from pydantic import BaseModel, ValidationError

from common.input_images import InputImageError, InputLimits
from common.inputs import Inputs, decode_inputs, remove_inputs, store_inputs
from common.rediskeys import RedisKeys
from gateway.errors import ApiError, from_validation_error, unreadable_reason
from gateway.jobs import Placed
from gateway.middlewares import access_of, body_limit
from gateway.state import CONFIG, JOBS, REDIS

M = TypeVar("M", bound=BaseModel)

IMAGE_FIELDS = ("image", "mask")
# What browsers and the OpenAI client send a list of files as: one image is taken under either name.
_ALIASES = {"image[]": "image", "mask[]": "mask"}
_DATA_URL = re.compile(r"^data:image/[A-Za-z0-9.+-]+;base64,")
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Uploaded:
    """The encoded input images a request sent (None: not sent)."""

    image: bytes | None = None
    mask: bytes | None = None

    def digest(self) -> str | None:
        """What the images add to an Idempotency-Key's fingerprint: a hash of their bytes; None without any."""
        if self.image is None and self.mask is None:
            return None
        parts = [hashlib.sha256(data).hexdigest() if data is not None else "-" for data in (self.image, self.mask)]
        return hashlib.sha256(" ".join(parts).encode()).hexdigest()

    async def decoded(self, limits: InputLimits, *, transparent_mask: bool = False) -> Inputs | None:
        """The images decoded and checked, on a thread (a large image would stall the event loop); None without an
        image. A mask without an image, or a refused image, is a 400 naming the field. `transparent_mask`: the mask
        marks what to repaint with alpha 0 (OpenAI's edits), not with white."""
        if self.image is None:
            if self.mask is not None:
                raise ApiError(400, "mask_without_image", "mask: a mask is sent with an image to repaint", field="mask")
            return None
        try:
            decode = functools.partial(decode_inputs, transparent_mask=transparent_mask)
            return await asyncio.to_thread(decode, self.image, self.mask, limits)
        except InputImageError as exc:
            raise refused(exc) from None


def refused(exc: InputImageError) -> ApiError:
    """An input image's refusal as a 400: the field, and the rule in its code (`image_format`, `mask_corrupt`,
    `mask_size`, ...)."""
    code = exc.rule if exc.rule.startswith("mask_") else f"{exc.field}_{exc.rule}"
    return ApiError(400, code, f"{exc.field}: {exc.message}", field=exc.field)


async def read_request(request: web.Request, model: type[M]) -> tuple[M, Uploaded]:
    """The body validated against `model` (with the gateway's limits), and the images it carries. 415 for a body
    neither JSON nor multipart; 400 naming the field at fault."""
    if request.content_type == "multipart/form-data":
        fields, uploaded = await _read_multipart(request)
        return _validated(model, json.dumps(_typed(model, fields)).encode(), request), uploaded
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "send the body as application/json or multipart/form-data")
    raw = await read_bounded(request)
    body = _validated(model, raw, request)
    return body, Uploaded(*(_base64(getattr(body, name, None), name) for name in IMAGE_FIELDS))


async def read_bounded(request: web.Request) -> bytes:
    """The whole body, refused (413) once past its route's limit, whether or not it declared a Content-Length."""
    limit = body_limit(request.app[CONFIG], access_of(request))
    raw = await request.content.read(limit + 1)
    extra = await request.content.read(1) if len(raw) <= limit else b""
    if len(raw) > limit or extra:
        raise ApiError(413, "body_too_large", f"the request body is over {limit} bytes")
    return raw


def _validated(model: type[M], raw: bytes, request: web.Request) -> M:
    try:
        return model.model_validate_json(raw, context=request.app[CONFIG].limits.context())
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def _base64(text: str | None, field: str) -> bytes | None:
    """A JSON image field's bytes: base64 (standard or URL-safe), a `data:image/...;base64,` prefix tolerated."""
    if text is None:
        return None
    payload = _DATA_URL.sub("", text, count=1).strip()
    try:
        return base64.b64decode(payload.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(
            400, "invalid_base64", f"{field}: not base64 (send the file's bytes base64-encoded)", field=field
        ) from None


async def _read_multipart(request: web.Request) -> tuple[dict[str, str], Uploaded]:
    """The form fields as text, and the image parts as bytes, each read within its bound."""
    config = request.app[CONFIG]
    images: dict[str, bytes] = {}
    fields: dict[str, str] = {}
    budget = _Budget(body_limit(config, access_of(request)), config.max_body_bytes)
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader) or part.name is None:
                raise ApiError(400, "invalid_multipart", "every part of the form has a name (no nested multipart)")
            name = _ALIASES.get(part.name, part.name)
            if name in IMAGE_FIELDS:
                if name in images:
                    raise ApiError(400, "one_image", f"{name}: send one file", field=name)
                images[name] = await _read_part(part, budget, name, config.input_limits.max_bytes)
            else:
                fields[name] = (await _read_part(part, budget, name, None)).decode("utf-8", "replace")
    # aiohttp's refusals of a malformed multipart body: its HTTP parser's errors for a part's header lines, and
    # ValueError/AssertionError from the reader itself.
    except (HttpProcessingError, ValueError, AssertionError) as exc:
        raise ApiError(
            400, "invalid_multipart", f"the multipart body cannot be read ({unreadable_reason(exc)})"
        ) from None
    return fields, Uploaded(images.get("image"), images.get("mask"))


class _Budget:
    """What is left of the body's limit, and of the form fields' share of it."""

    def __init__(self, body: int, fields: int) -> None:
        self.body = body
        self.fields = fields

    def take(self, size: int, is_field: bool) -> None:
        self.body -= size
        if is_field:
            self.fields -= size
        if self.body < 0:
            raise ApiError(413, "body_too_large", "the request body is over its limit")
        if self.fields < 0:
            raise ApiError(413, "body_too_large", "the form fields are over the body limit (--max-body-bytes)")


async def _read_part(part: BodyPartReader, budget: _Budget, name: str, image_limit: int | None) -> bytes:
    """A part's bytes, read in chunks: past the image limit, a 400 naming the field (as an image's size is
    refused); past the body's, 413."""
    data = bytearray()
    while chunk := await part.read_chunk(_CHUNK):
        budget.take(len(chunk), image_limit is None)
        data += chunk
        if image_limit is not None and len(data) > image_limit:
            raise ApiError(
                400, f"{name}_bytes", f"{name}: the image is over the limit of {image_limit} bytes", field=name
            )
    return bytes(data)


def _typed(model: type[BaseModel], fields: dict[str, str]) -> dict[str, Any]:
    """Form fields as JSON values: a text field as sent, any other as the JSON it spells (`20`, `true`, `[...]`),
    so one body validates by the same rules in either encoding; what is not JSON stays text, for the model to
    refuse naming the field."""
    text = _text_fields(model)
    return {name: value if name in text else _json_or_text(value) for name, value in fields.items()}


def _json_or_text(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


@functools.cache
def _text_fields(model: type[BaseModel]) -> frozenset[str]:
    """The fields of `model` whose values are text (their JSON Schema admits a string)."""
    properties = model.model_json_schema().get("properties", {})
    return frozenset(name for name, schema in properties.items() if _admits_string(schema))


def _admits_string(schema: dict[str, Any]) -> bool:
    if schema.get("type") == "string":
        return True
    return any(_admits_string(option) for option in schema.get("anyOf", []))


async def store_uploaded(request: web.Request, placed: Placed, inputs: Inputs | None, uploaded: Uploaded) -> Placed:
    """`placed` with its input images stored (in the blob store, else in Redis, for the job's result TTL) and its
    job naming them, before it is queued, with their bytes when in Redis (for the journal); as it was without
    images."""
    if inputs is None:
        return placed
    app = request.app
    stored = await store_inputs(placed.job, inputs, app[JOBS].blobs, app[REDIS], RedisKeys(app[CONFIG].key_prefix))
    job = placed.job.model_copy(update={"inputs": stored.refs})
    return dataclasses.replace(placed, job=job, images=uploaded.digest(), inputs_copy=stored.redis_copy)


async def remove_cancelled(app: web.Application, job_id: str) -> None:
    """Remove a cancelled job's input images now: no worker will read them (one that has them already keeps its
    copy), so they need not wait for their expiry."""
    record = await app[JOBS].record(job_id)
    if record is not None and record.job is not None and record.job.inputs is not None:
        await remove_inputs(record.job.inputs, app[JOBS].blobs, app[REDIS])
