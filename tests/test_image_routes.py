"""Input images through the gateway (gateway/inputs.py): base64 in JSON or files in multipart on `/v1/jobs`,
`/v1/generate` and the OpenAI `/v1/images/edits` (driven by the official client), decoded and checked before anything
is queued, stored beside the job, routed only to workers that run its kind (`request_kinds`: an inpainting model's
worker runs inpainting only); and the whole path through a
stand-in worker process that answers with the input image. A real redis-server throughout; a test plays the worker
where the worker's side is not the point."""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import openai
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient
from PIL import Image

from common.config import ConfigError
from common.input_images import InputLimits
from common.inputs import GONE, InputsUnavailable, decode_inputs, load_inputs, png
from common.jobstore import JobStore
from common.protocol import DEFAULT_IMG2IMG_STRENGTH, DEFAULT_INPAINT_STRENGTH, Job, JobResult, Shape
from common.rediskeys import RedisKeys
from common.registry import Registry, WorkerInfo
from common.streams import JobStreams
from common.strength import StrengthError, check_strength
from gateway.app import create_app
from gateway.cli import gateway_config
from gateway.config import GatewayConfig
from gateway.jobs import request_fingerprint
from gateway.schemas import GenerateRequest
from gateway.state import JOURNAL
from sdxl_serve.cli import build_parser
from sdxl_serve.processes import signal_group
from testkit import AsyncRedisProcess, RedisOptions, sdxl_serve_argv
from testkit.jobs import SHAPE, make_job
from testkit.objectstore import S3Server
from testkit.proxy import DropRule, FaultProxy
from testkit.redis import async_redis_process
from tests.protection import error_of, gateway
from tests.queues import Queue
from tests.support import (
    OLD_FINGERPRINT,
    OLD_REQUEST,
    TEST_SHAPES,
    ClientFactory,
    ProcessGroup,
    RedisServer,
    claim_next,
    finish,
    queued_jobs,
    register_worker,
    tiny_worker_args,
    wait_ready,
)
from tests.test_input_images import HOSTILE, encoded, gradient

pytestmark = pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")

Client = TestClient[Any, Any]
KEYS = RedisKeys()
IMAGE = encoded(gradient(64, 64), "PNG")
PHOTO = encoded(gradient(64, 48), "JPEG", quality=90)  # another size than the job's: resized by the worker
WIDE = encoded(gradient(128, 64), "PNG")


def mask_png(width: int = 64, height: int = 64, painted: bool = True) -> bytes:
    mask = np.zeros((height, width), dtype=bool)
    mask[16:48, 16:48] = painted
    return png(mask)


def edit_mask_png(width: int = 64, height: int = 64) -> bytes:
    """OpenAI's convention: an opaque picture, fully transparent where the image is edited (the same square)."""
    rgba = np.full((height, width, 4), 255, dtype=np.uint8)
    rgba[16:48, 16:48, 3] = 0
    return encoded(Image.fromarray(rgba, "RGBA"), "PNG")


def b64(data: bytes, prefix: str = "") -> str:
    return prefix + base64.b64encode(data).decode()


def form(fields: dict[str, str], **files: bytes) -> aiohttp.FormData:
    """A multipart body: `fields` as form fields, `files` as file parts."""
    data = aiohttp.FormData()
    for name, value in fields.items():
        data.add_field(name, value)
    for name, content in files.items():
        data.add_field(name, content, filename=f"{name}.bin", content_type="application/octet-stream")
    return data


@pytest.fixture
async def able_worker(redis_client: aioredis.Redis) -> AsyncIterator[None]:
    """A worker serving TEST_SHAPES' size at up to 10 steps that generates from input images (at the default 2 steps
    the default image-to-image strength, 0.3, would run no step)."""
    await register_worker(redis_client, image_input=True, max_steps=10)
    yield


async def queued(redis_client: aioredis.Redis) -> Job:
    """The next queued job, claimed as a worker would."""
    return (await claim_next(redis_client)).job


# --- Accepted: stored, queued with their keys, read back by the worker's loader.


async def test_a_base64_image_in_json_is_stored_and_the_job_names_it(
    client: Client, redis_client: aioredis.Redis, able_worker: None
) -> None:
    body = {"prompt": "a cat", "image": b64(IMAGE, "data:image/png;base64,"), "strength": 0.5, "seed": 3}
    response = await client.post("/v1/jobs", json=body)
    assert response.status == 202, await response.text()
    job = await queued(redis_client)
    assert job.inputs is not None and job.inputs.store == "redis" and job.inputs.mask is None
    assert (job.inputs.width, job.inputs.height, job.params.strength) == (64, 64, 0.5)
    assert b64(IMAGE)[:40] not in job.model_dump_json()  # the bytes are not in the stream, only their key
    assert 0 < await redis_client.ttl(job.inputs.image) <= 60  # the gateway's result TTL
    loaded = await load_inputs(job, None, redis_client)
    assert np.array_equal(loaded.image, np.asarray(gradient(64, 64))) and loaded.mask is None


async def test_multipart_fields_follow_the_json_rules_and_a_mask_makes_it_inpainting(
    client: Client, redis_client: aioredis.Redis, able_worker: None
) -> None:
    fields = {"prompt": "a cat", "num_inference_steps": "3", "seed": "7", "loras": "[]", "output_format": "jpeg"}
    response = await client.post("/v1/jobs", data=form(fields, image=IMAGE, mask=mask_png()))
    assert response.status == 202, await response.text()
    job = await queued(redis_client)
    assert (job.params.num_inference_steps, job.params.seed, job.output_format) == (3, 7, "jpeg")
    assert job.params.strength == DEFAULT_INPAINT_STRENGTH  # diffusers' inpainting default
    assert job.inputs is not None and job.inputs.mask is not None
    loaded = await load_inputs(job, None, redis_client)
    assert loaded.mask is not None and int(loaded.mask.sum()) == 32 * 32
    bad = await client.post("/v1/jobs", data=form({"prompt": "a cat", "seed": "seven"}, image=IMAGE))
    assert bad.status == 400 and (await error_of(bad))["field"] == "seed"


async def test_an_image_without_strength_takes_the_image_to_image_default(
    client: Client, redis_client: aioredis.Redis, able_worker: None
) -> None:
    response = await client.post("/v1/jobs", json={"prompt": "a cat", "image": b64(PHOTO), "num_inference_steps": 10})
    assert response.status == 202
    job = await queued(redis_client)
    assert job.params.strength == DEFAULT_IMG2IMG_STRENGTH and job.inputs is not None
    assert (job.inputs.width, job.inputs.height) == (64, 48)


# --- Refused before anything is queued: 400 naming the field.


@pytest.mark.parametrize("name", sorted(HOSTILE))
async def test_a_hostile_image_is_a_400_naming_image_on_every_route(
    name: str, client: Client, redis_client: aioredis.Redis, able_worker: None
) -> None:
    data = HOSTILE[name][0]()
    rules = HOSTILE[name][1]
    codes = {f"image_{rule}" for rule in ([rules] if isinstance(rules, str) else rules)}
    answers = [
        await client.post("/v1/jobs", json={"prompt": "a cat", "image": b64(data)}),
        await client.post("/v1/generate", data=form({"prompt": "a cat"}, image=data)),
    ]
    for response in answers:
        assert response.status == 400, name
        error = await error_of(response)
        assert error["field"] == "image" and error["code"] in codes, (name, error)
    edits = await client.post("/v1/images/edits", data=form({"prompt": "a cat"}, image=data))
    error = (await edits.json())["error"]
    assert edits.status == 400 and error["param"] == "image" and error["code"] in codes
    assert await queued_jobs(redis_client) == 0


@pytest.mark.parametrize(
    ("mask", "code"),
    [
        (lambda: mask_png(32, 32), "mask_size"),
        (lambda: mask_png(painted=False), "mask_empty"),
        (lambda: IMAGE[: len(IMAGE) // 2], "mask_corrupt"),
        (lambda: encoded(gradient(), "GIF"), "mask_format"),
    ],
)
async def test_a_bad_mask_is_a_400_naming_mask(
    mask: Callable[[], bytes], code: str, client: Client, redis_client: aioredis.Redis, able_worker: None
) -> None:
    for response in (
        await client.post("/v1/jobs", json={"prompt": "a cat", "image": b64(IMAGE), "mask": b64(mask())}),
        await client.post("/v1/jobs", data=form({"prompt": "a cat"}, image=IMAGE, mask=mask())),
    ):
        error = await error_of(response)
        assert response.status == 400 and (error["field"], error["code"]) == ("mask", code)
    assert await queued_jobs(redis_client) == 0


@pytest.mark.parametrize(
    ("body", "field", "code"),
    [
        ({"strength": 0.5}, "strength", "strength_without_image"),
        ({"mask": b64(IMAGE)}, "mask", "mask_without_image"),
        ({"image": b64(IMAGE), "strength": 0}, "strength", "greater_than"),
        ({"image": b64(IMAGE), "strength": 1.5}, "strength", "less_than_equal"),
        ({"image": b64(IMAGE), "strength": 0.1, "num_inference_steps": 3}, "strength", "strength_too_small"),
        ({"image": "not base64!"}, "image", "invalid_base64"),
        ({"image": 42}, "image", "string_type"),
    ],
)
async def test_fields_that_need_an_image_or_break_a_rule_are_named(
    body: dict[str, Any], field: str, code: str, client: Client, redis_client: aioredis.Redis, able_worker: None
) -> None:
    response = await client.post("/v1/jobs", json={"prompt": "a cat", **body})
    error = await error_of(response)
    assert response.status == 400 and (error["field"], error["code"]) == (field, code)
    assert await queued_jobs(redis_client) == 0


async def test_a_strength_that_runs_no_step_is_refused_in_the_words_of_the_workers_rule(
    client: Client, redis_client: aioredis.Redis, able_worker: None
) -> None:
    body = {"prompt": "a cat", "image": b64(IMAGE), "strength": 0.3, "num_inference_steps": 3}
    response = await client.post("/v1/jobs", json=body)
    error = await error_of(response)
    with pytest.raises(StrengthError) as rule:
        check_strength(3, 0.3)  # 0.3 * 3 is 0.899...: no step
    assert response.status == 400 and (error["code"], error["message"]) == ("strength_too_small", str(rule.value))
    assert await queued_jobs(redis_client) == 0


async def test_bodies_over_the_image_route_limit_are_413_and_images_over_the_input_limit_400(
    aiohttp_client: ClientFactory, redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    await register_worker(redis_client, image_input=True)
    client = await gateway(
        aiohttp_client, redis_server, max_image_body_bytes=8192, input_limits=InputLimits(max_bytes=4096)
    )
    noise = encoded(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)), "PNG")
    assert len(noise) > 8192
    response = await client.post("/v1/jobs", json={"prompt": "a cat", "image": b64(noise)})
    assert response.status == 413 and (await error_of(response))["code"] == "body_too_large"

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: cut off while read
        yield b'{"prompt": "a cat", "image": "'
        yield b64(noise).encode()
        yield b'"}'

    response = await client.post("/v1/jobs", data=chunked(), headers={"Content-Type": "application/json"})
    assert response.status == 413
    response = await client.post("/v1/jobs", data=form({"prompt": "a cat"}, image=noise))
    assert response.status == 413
    medium = encoded(Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40, 3), np.uint8)), "PNG")
    assert 4096 < len(medium) < 8000
    response = await client.post("/v1/jobs", data=form({"prompt": "a cat"}, image=medium))
    error = await error_of(response)
    assert response.status == 400 and (error["field"], error["code"]) == ("image", "image_bytes")
    assert await queued_jobs(redis_client) == 0


def test_the_image_body_limit_flag_reaches_the_config_and_is_bounded() -> None:
    args = build_parser().parse_args(["gateway", "--max-image-body-bytes", "8192"])
    assert gateway_config(args).max_image_body_bytes == 8192
    with pytest.raises(ConfigError, match="--max-image-body-bytes"):
        gateway_config(build_parser().parse_args(["gateway", "--max-image-body-bytes", "10"]))


# --- Capability: only workers that run a job's kind (text, image-to-image, inpainting) get it.


async def test_an_image_is_refused_while_no_worker_generates_from_one(
    client: Client, redis_client: aioredis.Redis, fake_worker: None
) -> None:
    response = await client.post("/v1/jobs", json={"prompt": "a cat", "image": b64(IMAGE)})
    error = await error_of(response)
    assert response.status == 400 and (error["field"], error["code"]) == ("image", "image_input_unsupported")
    await register_worker(redis_client, worker_id="warming", state="warming", image_input=True)
    response = await client.post("/v1/jobs", json={"prompt": "a cat", "image": b64(IMAGE)})
    assert response.status == 503 and response.headers["Retry-After"]
    assert (await error_of(response))["code"] == "no_ready_worker"
    assert await queued_jobs(redis_client) == 0
    assert (await client.post("/v1/jobs", json={"prompt": "a cat"})).status == 202  # text-to-image as before


@pytest.mark.parametrize("routing", ["shared", "random", "p2c"])
async def test_a_job_with_an_image_goes_only_to_a_worker_that_advertises_image_input(
    routing: str, aiohttp_client: ClientFactory, redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    await register_worker(redis_client, worker_id="plain", rows=8, free_rows=8)
    await register_worker(redis_client, worker_id="able", image_input=True, rows=8, free_rows=1)
    client = await gateway(aiohttp_client, redis_server, routing=routing)
    store = JobStore(redis_client, KEYS)
    for _ in range(4):
        body = {"prompt": "a cat", "image": b64(IMAGE), "n": 1, "strength": 0.5}  # one of the 2 default steps
        response = await client.post("/v1/jobs", json=body)
        record = await store.record((await response.json())["id"])
        assert record is not None and record.stream == KEYS.worker_stream("able")


INPAINTING_ONLY: dict[str, Any] = {
    "image_input": True,
    "request_kinds": ["inpainting"],
}  # a worker of a 9-channel inpainting model
BODIES = {
    "text-to-image": {"prompt": "a cat", "n": 1},
    "image-to-image": {"prompt": "a cat", "n": 1, "image": b64(IMAGE), "strength": 0.5},
    "inpainting": {"prompt": "a cat", "n": 1, "image": b64(IMAGE), "mask": b64(mask_png())},
}


@pytest.mark.parametrize("routing", ["shared", "random", "p2c"])
async def test_text_and_image_to_image_jobs_never_reach_an_inpainting_worker_and_inpainting_reaches_either(
    routing: str, aiohttp_client: ClientFactory, redis_server: RedisServer, redis_client: aioredis.Redis
) -> None:
    """The inpainting worker has the more free rows (p2c's choice) and reads the size's shared stream: a text or
    image-to-image job must still go to the base worker's own stream; an inpainting job may go anywhere."""
    await register_worker(redis_client, worker_id="inpainter", rows=8, free_rows=8, max_steps=10, **INPAINTING_ONLY)
    await register_worker(redis_client, worker_id="base", image_input=True, rows=8, free_rows=1, max_steps=10)
    client = await gateway(aiohttp_client, redis_server, routing=routing)
    store = JobStore(redis_client, KEYS)

    async def streams(kind: str) -> set[str | None]:
        chosen = set()
        for _ in range(12):
            response = await client.post("/v1/jobs", json=BODIES[kind])
            assert response.status == 202, await response.text()
            record = await store.record((await response.json())["id"])
            chosen.add(record.stream if record is not None else None)
        return chosen

    for kind in ("text-to-image", "image-to-image"):
        assert await streams(kind) == {KEYS.worker_stream("base")}, kind
    reaches_both = {KEYS.size_stream(TEST_SHAPES[0].size), KEYS.worker_stream("inpainter"), KEYS.worker_stream("base")}
    assert await streams("inpainting") <= reaches_both
    if routing == "p2c":
        assert await streams("inpainting") == {KEYS.worker_stream("inpainter")}  # the more free rows


async def test_a_kind_no_worker_runs_is_refused_naming_the_field_that_would_make_it_one(
    client: Client, redis_client: aioredis.Redis
) -> None:
    await register_worker(redis_client, worker_id="inpainter", max_steps=10, **INPAINTING_ONLY)
    response = await client.post("/v1/jobs", json=BODIES["text-to-image"])
    error = await error_of(response)
    assert response.status == 400 and (error["field"], error["code"]) == ("image", "request_kind_unsupported")
    assert "run inpainting only, not text-to-image" in error["message"]
    response = await client.post("/v1/jobs", json=BODIES["image-to-image"])
    error = await error_of(response)
    assert response.status == 400 and (error["field"], error["code"]) == ("mask", "request_kind_unsupported")
    assert error["message"].startswith("mask: ") and "not image-to-image: send a mask" in error["message"]
    assert await queued_jobs(redis_client) == 0
    assert (await client.post("/v1/jobs", json=BODIES["inpainting"])).status == 202
    await register_worker(redis_client, worker_id="warming", state="warming", image_input=True, max_steps=10)
    response = await client.post("/v1/jobs", json=BODIES["text-to-image"])  # a base worker comes: retry soon
    assert response.status == 503 and (await error_of(response))["code"] == "no_ready_worker"


# --- Idempotency: the images' bytes are part of what a key binds to.


async def test_the_fingerprint_is_unchanged_without_images_and_binds_the_images_bytes(
    client: Client, redis_client: aioredis.Redis, able_worker: None
) -> None:
    assert request_fingerprint(GenerateRequest.model_validate(OLD_REQUEST)) == OLD_FINGERPRINT
    headers = {"Idempotency-Key": "edit-1"}
    first = await client.post(
        "/v1/jobs", json={"prompt": "a cat", "image": b64(IMAGE), "strength": 0.5}, headers=headers
    )
    again = await client.post(
        "/v1/jobs", data=form({"prompt": "a cat", "strength": "0.5"}, image=IMAGE), headers=headers
    )
    assert first.status == 202 and again.status == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert (await first.json())["id"] == (await again.json())["id"]  # base64 or multipart: the same bytes
    other = await client.post(
        "/v1/jobs", json={"prompt": "a cat", "image": b64(PHOTO), "strength": 0.5}, headers=headers
    )
    assert other.status == 422  # another image: another request
    assert await queued_jobs(redis_client) == 1


async def test_cancelling_a_job_removes_its_inputs(
    client: Client, redis_client: aioredis.Redis, able_worker: None
) -> None:
    response = await client.post("/v1/jobs", json={"prompt": "a cat", "image": b64(IMAGE), "mask": b64(mask_png())})
    job_id = (await response.json())["id"]
    record = await JobStore(redis_client, KEYS).record(job_id)
    assert record is not None and record.job is not None and record.job.inputs is not None
    refs = record.job.inputs
    assert await redis_client.exists(refs.image, refs.mask or "") == 2
    assert (await client.delete(f"/v1/jobs/{job_id}")).status == 200
    assert await redis_client.exists(refs.image, refs.mask or "") == 0


# --- The official OpenAI client's images.edit, unchanged.


@pytest.fixture
async def oai(client: Client) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0) as oai:
        yield oai


async def test_openai_client_edits_an_image_with_a_mask(
    oai: openai.AsyncOpenAI, redis_client: aioredis.Redis, able_worker: None
) -> None:
    async def worker() -> Job:
        claimed = await claim_next(redis_client)
        await finish(redis_client, claimed, [b"edited"])
        return claimed.job

    serving = asyncio.create_task(worker())
    response = await oai.images.edit(
        image=("cat.png", IMAGE, "image/png"),
        mask=("mask.png", edit_mask_png(), "image/png"),
        prompt="a cat in a hat",
        size="64x64",
        response_format="b64_json",
    )
    job = await serving
    assert response.data is not None and [base64.b64decode(d.b64_json or "") for d in response.data] == [b"edited"]
    assert (job.params.prompt, job.params.n, job.params.shape, job.params.strength) == (
        "a cat in a hat",
        1,
        TEST_SHAPES[0],
        DEFAULT_INPAINT_STRENGTH,
    )
    loaded = await load_inputs(job, None, redis_client)
    assert np.array_equal(loaded.image, np.asarray(gradient(64, 64)))
    square = np.zeros((64, 64), dtype=bool)
    square[16:48, 16:48] = True
    assert loaded.mask is not None and np.array_equal(loaded.mask, square)  # the transparent square is repainted


async def test_openai_client_edit_without_a_size_is_made_at_the_input_images_size_where_a_worker_serves_it(
    oai: openai.AsyncOpenAI, redis_client: aioredis.Redis
) -> None:
    """As OpenAI's edits: no `size`, the input's size (128x64 here) when a live worker serves it; an input of a size no
    live worker serves (40x40, or 128x64 while its only worker warms) is edited at the cluster's default (64x64)."""
    wide = (TEST_SHAPES[0], Shape(width=128, height=64, steps=2))
    await register_worker(redis_client, worker_id="wide", shapes=wide, image_input=True, max_steps=10)
    await register_worker(redis_client, worker_id="warming", state="warming", shapes=wide[1:], image_input=True)

    async def edited(
        image: bytes, width: int, height: int, size: str | openai.Omit = openai.omit
    ) -> tuple[Shape, str | None]:
        async def worker() -> Job:
            claimed = await claim_next(redis_client, shapes=wide)
            await finish(redis_client, claimed, [b"edited"])
            return claimed.job

        serving = asyncio.create_task(worker())
        mask = ("mask.png", edit_mask_png(width, height), "image/png")
        response = await oai.images.edit(
            image=("in.png", image, "image/png"), mask=mask, prompt="a hat", response_format="b64_json", size=size
        )
        return (await serving).params.shape, response.size

    assert await edited(WIDE, 128, 64) == (wide[1], "128x64")
    assert await edited(WIDE, 128, 64, size="auto") == (wide[1], "128x64")
    assert await edited(WIDE, 128, 64, size="64x64") == (wide[0], "64x64")  # a size named is the size made
    assert await edited(encoded(gradient(40, 40), "PNG"), 40, 40) == (wide[0], "64x64")
    await register_worker(redis_client, worker_id="wide", state="draining", shapes=wide, image_input=True)
    await register_worker(redis_client, worker_id="default", image_input=True, max_steps=10)
    assert await edited(WIDE, 128, 64) == (wide[0], "64x64")  # 128x64's workers warm or drain: the default


async def test_openai_client_edit_errors_name_the_parameter(
    oai: openai.AsyncOpenAI, redis_client: aioredis.Redis, able_worker: None
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await oai.images.edit(image=("cat.gif", encoded(gradient(), "GIF"), "image/gif"), prompt="a cat")
    assert caught.value.param == "image" and caught.value.code == "image_format"
    with pytest.raises(openai.BadRequestError) as caught:
        await oai.images.edit(image=("cat.png", IMAGE, "image/png"), mask=("m.png", edit_mask_png(8, 8)), prompt="a")
    assert caught.value.param == "mask" and caught.value.code == "mask_size"
    with pytest.raises(openai.BadRequestError) as caught:  # white on black, as /v1/jobs takes: no transparency
        await oai.images.edit(image=("cat.png", IMAGE, "image/png"), mask=("m.png", mask_png()), prompt="a cat")
    assert caught.value.param == "mask" and caught.value.code == "mask_alpha"
    with pytest.raises(openai.BadRequestError) as caught:
        await oai.images.edit(image=("cat.png", IMAGE, "image/png"), prompt="a cat", size="999x999")
    assert caught.value.param == "size"
    with pytest.raises(openai.BadRequestError) as caught:  # an edit without an image (a JSON body)
        await oai.post("/images/edits", body={"prompt": "a cat"}, cast_to=openai.types.ImagesResponse)
    assert caught.value.param == "image" and caught.value.code == "missing"
    assert await queued_jobs(redis_client) == 0


# --- The whole path: multipart upload, stored, queued, a stand-in worker process reads it, the result is the input.

STANDIN = RedisKeys("imgin")  # a prefix of its own: no other test's workers see these jobs


async def test_an_uploaded_image_comes_back_from_a_standin_worker_through_its_loader(
    aiohttp_client: ClientFactory, redis_server: RedisServer, redis_client: aioredis.Redis, processes: ProcessGroup
) -> None:
    url = redis_server.url(0)
    argv = [sys.executable, "-m", "testkit.standin", "--redis-url", url, "--worker-id", "imgin-1", "--key-prefix",
            STANDIN.prefix, "--sizes", "64x64", "--max-steps", "2", "--step-s", "0", "--image-input"]  # fmt: skip
    processes.start_argv("imgin-1", argv)
    try:
        (info,) = await wait_ready(url, 1, STANDIN.prefix)
        assert info.image_input
        client = await gateway(aiohttp_client, redis_server, key_prefix=STANDIN.prefix, request_timeout_s=60.0)
        fields = {"prompt": "a cat", "n": "2", "num_inference_steps": "2"}
        response = await client.post("/v1/generate", data=form(fields, image=PHOTO, mask=mask_png(64, 48)))
        assert response.status == 200, await response.text()
        images = (await response.json())["images"]
    finally:
        processes.stop("imgin-1")
    expected = decode_inputs(PHOTO, None, InputLimits()).image
    resized = np.asarray(Image.fromarray(expected).resize((64, 64), Image.Resampling.LANCZOS, reducing_gap=None))
    assert len(images) == 2
    for image in images:
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(image))).convert("RGB")), resized)


INPAINTER = RedisKeys("inpaintw")


@pytest.fixture(scope="module")
def inpainting_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a 9-channel inpainting UNet, written by the CLI as a user would."""
    directory = tmp_path_factory.mktemp("models") / "tiny-sdxl-inpainting"
    subprocess.run(sdxl_serve_argv("tiny-model", "--inpainting", str(directory)), check=True, stdout=subprocess.DEVNULL)
    return directory


async def test_a_worker_on_the_inpainting_model_advertises_inpainting_only_and_runs_it(
    inpainting_model: Path,
    redis_server: RedisServer,
    redis_client: aioredis.Redis,
    processes: ProcessGroup,
    aiohttp_client: ClientFactory,
) -> None:
    """A real worker process on the 9-channel model: its registry entry says inpainting only, from the first one it
    publishes while warming (read from the model's config before the weights load); a gateway refuses it a text
    request (400 naming `image`) and an inpainting request comes back with images."""
    url = redis_server.url(0)
    events = redis_client.pubsub()
    await events.subscribe(INPAINTER.worker_events_channel)
    processes.start(
        "inpaint-1", *tiny_worker_args(url, inpainting_model, "inpaint-1", "--key-prefix", INPAINTER.prefix)
    )
    try:
        first = await first_worker_event(events)
        assert (first.state, first.request_kinds) == ("warming", ["inpainting"])
        try:
            (info,) = await wait_ready(url, 1, INPAINTER.prefix)
        except TimeoutError:
            pytest.fail("worker not ready:\n" + processes.log("inpaint-1")[-3000:])
        assert (info.image_input, info.request_kinds) == (True, ["inpainting"])
        client = await gateway(aiohttp_client, redis_server, key_prefix=INPAINTER.prefix, request_timeout_s=120.0)
        response = await client.post("/v1/generate", json={"prompt": "a cat", "n": 1})
        error = await error_of(response)
        assert response.status == 400 and (error["field"], error["code"]) == ("image", "request_kind_unsupported")
        body = {"prompt": "a cat", "n": 1, "image": b64(IMAGE), "mask": b64(mask_png())}
        response = await client.post("/v1/generate", json=body)
        assert response.status == 200, await response.text()
        assert len((await response.json())["images"]) == 1
    finally:
        processes.stop("inpaint-1")
        await events.aclose()


async def first_worker_event(events: aioredis.client.PubSub) -> WorkerInfo:
    """The next worker entry published on the channel `events` is subscribed to (TimeoutError after 120s)."""
    async with asyncio.timeout(120):
        while True:
            message = await events.get_message(ignore_subscribe_messages=True, timeout=120)
            if message is not None:
                return WorkerInfo.model_validate_json(message["data"])


OUTAGE = RedisKeys("imgout")
WAIT_S = 60.0  # how long the outage test waits for the worker to react, and for the job to finish


async def test_an_image_store_down_as_a_worker_reads_the_inputs_delays_the_job_and_it_completes_once(
    aiohttp_client: ClientFactory,
    redis_server: RedisServer,
    redis_client: aioredis.Redis,
    processes: ProcessGroup,
    s3_env: S3Server,
) -> None:
    """A worker takes a job whose input images are in an S3 store that stops answering (SeaweedFS paused): the
    job is not failed; the worker leaves it pending, stops claiming (registry state draining) and probes the
    store, and once the store is back it takes the job again and completes it, with one result."""
    url = redis_server.url(0)
    store = s3_env.url("inputs", "outage")
    argv = [sys.executable, "-m", "testkit.standin", "--redis-url", url, "--worker-id", "imgout-1", "--key-prefix",
            OUTAGE.prefix, "--sizes", "64x64", "--max-steps", "2", "--step-s", "0", "--image-input",
            "--blob-store", f"{store}&timeout=0.5"]  # fmt: skip
    worker = processes.start_argv("imgout-1", argv)
    await wait_ready(url, 1, OUTAGE.prefix)
    client = await gateway(aiohttp_client, redis_server, key_prefix=OUTAGE.prefix, blob_store=store)
    signal_group(worker.pid, signal.SIGSTOP)  # the job is queued, its inputs stored, before the worker looks
    try:
        body = {"prompt": "a cat", "num_inference_steps": 2, "n": 1, "strength": 0.5, "image": b64(PHOTO)}
        response = await client.post("/v1/jobs", json=body)
        assert response.status == 202, await response.text()
        job_id: str = (await response.json())["id"]
        s3_env.pause()
    finally:
        signal_group(worker.pid, signal.SIGCONT)
    try:
        await until_worker_state(redis_client, "draining", job_id)
        assert await JobStore(redis_client, OUTAGE).fetch_meta(job_id) is None  # neither failed nor done
    finally:
        s3_env.resume()
    assert (await finished(redis_client, job_id)).status == "succeeded", processes.log("imgout-1")[-3000:]
    image = await client.get(f"/v1/jobs/{job_id}/images/0")
    assert image.status == 200
    expected = decode_inputs(PHOTO, None, InputLimits()).image
    resized = np.asarray(Image.fromarray(expected).resize((64, 64), Image.Resampling.LANCZOS, reducing_gap=None))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(await image.read())).convert("RGB")), resized)
    assert await JobStreams(redis_client, OUTAGE).depth() == 0  # settled: nothing queued or pending
    assert await redis_client.hget(OUTAGE.stats, "duplicate_results") is None
    processes.stop("imgout-1")


async def give_backs(redis_client: aioredis.Redis, job_id: str) -> int:
    """How many deliveries of the job were given back, its input images unreachable (its record's count)."""
    return int(await redis_client.hget(OUTAGE.job(job_id), "unreachable") or 0)


async def until_given_back(redis_client: aioredis.Redis, job_id: str, count: int) -> None:
    """Until `count` deliveries of the job were given back, or it has a result (then the caller's check fails)."""
    store = JobStore(redis_client, OUTAGE)
    async with asyncio.timeout(WAIT_S):
        while await give_backs(redis_client, job_id) < count:
            if await store.fetch_meta(job_id) is not None:
                return
            await asyncio.sleep(0.05)  # a record's field has no event to wait on


@pytest.fixture
async def s3_proxy(s3_env: S3Server) -> AsyncIterator[FaultProxy]:
    """A fault proxy in front of the S3 server (its credentials in the environment)."""
    proxy = FaultProxy("s3", int(s3_env.endpoint.rsplit(":", 1)[1]))
    await proxy.start()
    yield proxy
    await proxy.close()


async def inputs_unreachable_twice(
    aiohttp_client: ClientFactory,
    redis_server: RedisServer,
    redis_client: aioredis.Redis,
    processes: ProcessGroup,
    s3_env: S3Server,
    proxy: FaultProxy,
    name: str,
    *limits: str,
) -> tuple[Client, str]:
    """A stand-in worker process (`limits`: its delivery limits) reaches the S3 store through a fault proxy; an image
    job's inputs are stored, and the worker's first two deliveries of it find the store unreachable: the proxy resets
    every connection for the first, and for the second lets the worker's write probe through, then black-holes what
    follows (the read of the inputs). Returns the gateway's client and the job's id once the second delivery was given
    back (or the job has a result), with the store reachable again."""
    url = redis_server.url(0)
    store = s3_env.url("inputs", name)
    proxied = f"s3://inputs/{name}?endpoint=http://127.0.0.1:{proxy.port}&timeout=0.5"
    argv = [sys.executable, "-m", "testkit.standin", "--redis-url", url, "--worker-id", "imgout-1", "--key-prefix",
            OUTAGE.prefix, "--sizes", "64x64", "--max-steps", "2", "--step-s", "0", "--image-input",
            "--blob-store", proxied, *limits]  # fmt: skip
    processes.start_argv("imgout-1", argv)
    await wait_ready(url, 1, OUTAGE.prefix)
    client = await gateway(aiohttp_client, redis_server, key_prefix=OUTAGE.prefix, blob_store=store)
    try:
        proxy.partition(refuse=True)
        body = {"prompt": "a cat", "num_inference_steps": 2, "n": 1, "strength": 0.5, "image": b64(PHOTO)}
        response = await client.post("/v1/jobs", json=body)
        assert response.status == 202, await response.text()
        job_id: str = (await response.json())["id"]
        await until_worker_state(redis_client, "draining", job_id)  # the first delivery given back
        probed = proxy.pause_after(DropRule(command=b"PUT ", reply_contains=b" 200 "))
        proxy.heal()
        await asyncio.wait_for(probed.wait(), WAIT_S)  # the probe's write went through; the read will not
        await until_given_back(redis_client, job_id, 2)
    finally:
        proxy.partition(refuse=True)  # the held requests dropped, then the store reachable again
        proxy.heal()
    return client, job_id


# `unreachable_twice(name, *limits)`: `inputs_unreachable_twice` on the test's services.
UnreachableTwice = Callable[..., Awaitable[tuple[Client, str]]]


@pytest.fixture
def unreachable_twice(
    aiohttp_client: ClientFactory,
    redis_server: RedisServer,
    redis_client: aioredis.Redis,
    processes: ProcessGroup,
    s3_env: S3Server,
    s3_proxy: FaultProxy,
) -> UnreachableTwice:
    services = (aiohttp_client, redis_server, redis_client, processes, s3_env, s3_proxy)
    return functools.partial(inputs_unreachable_twice, *services)


async def test_a_job_given_back_for_unreachable_inputs_more_often_than_max_deliveries_still_completes(
    unreachable_twice: UnreachableTwice, redis_client: aioredis.Redis, processes: ProcessGroup
) -> None:
    """With `--max-deliveries 1`, a job whose input images' store is unreachable on its first two deliveries is not
    dead-lettered: those deliveries were given back, not lost to a dying worker. Once the store answers it completes,
    once, on its third delivery."""
    client, job_id = await unreachable_twice("flaky", "--max-deliveries", "1")
    result = await finished(redis_client, job_id)
    assert result.status == "succeeded", (result.error, processes.log("imgout-1")[-3000:])
    assert await give_backs(redis_client, job_id) == 2
    assert (await client.get(f"/v1/jobs/{job_id}/images/0")).status == 200
    assert await redis_client.xlen(OUTAGE.dead_letter_stream) == 0
    assert await JobStreams(redis_client, OUTAGE).depth() == 0  # settled: nothing queued or pending
    assert await redis_client.hget(OUTAGE.stats, "duplicate_results") is None
    processes.stop("imgout-1")


async def test_a_job_whose_inputs_stay_unreachable_is_dead_lettered_past_max_input_retries_naming_the_store(
    unreachable_twice: UnreachableTwice, redis_client: aioredis.Redis, processes: ProcessGroup
) -> None:
    """A job whose input images cannot be read does not circulate for ever: with `--max-input-retries 1` it is
    delivered again once for it, and when the store is unreachable on that delivery too it is dead-lettered, its
    failure naming the cause (the store's error), not a delivery count."""
    _, job_id = await unreachable_twice("gone", "--max-input-retries", "1")
    result = await finished(redis_client, job_id)
    assert result.status == "failed", processes.log("imgout-1")[-3000:]
    assert result.error is not None
    assert result.error.startswith("gave up: its input images could not be read on 2 deliveries, their store"), (
        result.error
    )
    assert "S3 store" in result.error and "delivered" not in result.error, result.error
    dead: Any = await redis_client.xrange(OUTAGE.dead_letter_stream)
    ((_, entry),) = dead
    assert entry[b"reason"].decode().startswith("its input images could not be read on 2 deliveries")
    assert await JobStreams(redis_client, OUTAGE).depth() == 0  # settled: nothing queued or pending
    processes.stop("imgout-1")


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[AsyncRedisProcess]:
    """A redis-server of the test's own (AOF on, no rewrites: a copy of its files is an older state), which it may
    roll back."""
    (tmp_path / "redis").mkdir()
    options = RedisOptions(appendonly=True, extra=("--auto-aof-rewrite-percentage", "0"))
    async with async_redis_process(options, tmp_path / "redis") as server:
        yield server


ROLLBACK_PROMPT = "a cat, rolled back"


def rollback_standin(processes: ProcessGroup, url: str) -> None:
    argv = [sys.executable, "-m", "testkit.standin", "--redis-url", url, "--worker-id", "imgroll-1",
            "--sizes", "64x64", "--max-steps", "2", "--step-s", "0", "--image-input"]  # fmt: skip
    processes.start_argv("imgroll-1", argv)


@pytest.mark.parametrize("case", ["worker-after", "worker-held-it", "journal-input-bytes-0"])
async def test_an_image_job_a_rolled_back_redis_lost_is_replayed_with_its_inputs_and_completes(
    aiohttp_client: ClientFactory, own_redis: AsyncRedisProcess, processes: ProcessGroup, tmp_path: Path, case: str
) -> None:
    """Redis comes back from a snapshot taken before an image-to-image job was accepted (its inputs stored in Redis):
    the job and its input images are gone. The accepting gateway's journal queues it again with them, and a stand-in
    worker process answers with the input image, once: one started after the rollback, or one that was given the
    job before it (cut off from Redis by a fault proxy right after the delivery) and finds its inputs gone, so gives
    the job back rather than failing it (the gateway cut off from Redis meanwhile, so that its journal sweeps only
    after the give-back). A gateway that keeps no copy (`--journal-input-bytes 0`) queues it again
    all the same, and it fails, saying its inputs are gone."""
    url = own_redis.url()
    redis_client = aioredis.Redis.from_url(url)
    proxy = FaultProxy("worker", own_redis.port)
    # The gateway reaches Redis through a proxy of its own, black-holed while the worker holds the job: its journal
    # sweeps only once the worker has given the job back, so that path is the one taken (not a sweep before it).
    gateway_proxy = FaultProxy("gateway", own_redis.port)
    await proxy.start()
    await gateway_proxy.start()
    try:
        await register_worker(redis_client, image_input=True, max_steps=10)  # the gateway accepts image jobs
        kept = case != "journal-input-bytes-0"
        config = GatewayConfig(redis_url=gateway_proxy.url(), result_ttl_s=60, journal_input_bytes=kept * (1 << 30))
        client = await aiohttp_client(create_app(config))
        held = case == "worker-held-it"
        if held:
            rollback_standin(processes, proxy.url())
            await wait_ready(url, 2)
        own_redis.snapshot(tmp_path / "snapshot")  # before the submit
        delivered = proxy.pause_after(DropRule(reply_contains=ROLLBACK_PROMPT.encode()))  # fires only if held
        job_id = await submit(client, {"image": b64(IMAGE)})
        if held:
            await asyncio.wait_for(delivered.wait(), WAIT_S)  # the worker has the job; its next call waits
            gateway_proxy.partition()
        await own_redis.restore(tmp_path / "snapshot")
        proxy.heal()
        if held:
            await logged(processes, "imgroll-1", f"job {job_id}: lost by Redis with its input images; given back")
            gateway_proxy.heal()
        else:
            rollback_standin(processes, url)
        result = await finished(redis_client, job_id, KEYS)
        assert client.app[JOURNAL].resubmitted == 1  # Redis did lose it: the journal queued it again
        if not kept:
            assert result.status == "failed" and result.error == GONE, result.error
            return
        assert result.status == "succeeded", (result.error, processes.log("imgroll-1")[-3000:])
        image = await client.get(f"/v1/jobs/{job_id}/images/0")
        assert image.status == 200
        assert np.array_equal(
            np.asarray(Image.open(io.BytesIO(await image.read())).convert("RGB")), np.asarray(gradient(64, 64))
        )
        assert await JobStreams(redis_client, KEYS).depth() == 0  # settled: nothing queued or pending
        assert await redis_client.hget(KEYS.stats, "duplicate_results") is None
    finally:
        if "imgroll-1" in processes.processes:
            processes.stop("imgroll-1")
        await proxy.close()
        await gateway_proxy.close()
        await redis_client.aclose()


async def logged(processes: ProcessGroup, name: str, line: str) -> None:
    """Until process `name` has logged `line`, within WAIT_S."""
    async with asyncio.timeout(WAIT_S):
        while line not in processes.log(name):  # noqa: ASYNC110 (a log line has no event to wait on)
            await asyncio.sleep(0.05)


async def submit(client: Client, fields: dict[str, Any]) -> str:
    """An image-to-image job submitted: its id."""
    body = {"prompt": ROLLBACK_PROMPT, "num_inference_steps": 2, "n": 1, "strength": 0.5} | fields
    response = await client.post("/v1/jobs", json=body)
    assert response.status == 202, await response.text()
    job_id: str = (await response.json())["id"]
    return job_id


async def test_the_journal_keeps_redis_inputs_within_its_budget_the_oldest_dropped_first(
    aiohttp_client: ClientFactory, redis_server: RedisServer, redis_client: aioredis.Redis, able_worker: None
) -> None:
    """Two image jobs, room for one copy: the first job's goes. Redis then loses both jobs and their inputs: the
    journal stores the second's again before queueing it, and queues the first without them (its worker finds them
    gone). Copies are let go as their jobs end."""
    client = await gateway(aiohttp_client, redis_server, journal_input_bytes=len(png(np.asarray(gradient(64, 64)))))
    journal = client.app[JOURNAL]
    body = {"prompt": "a cat", "num_inference_steps": 10, "image": b64(IMAGE)}
    first, second = [(await (await client.post("/v1/jobs", json=body | {"seed": k})).json())["id"] for k in (1, 2)]
    assert (journal.inputs_dropped, 0 < journal.input_bytes) == (1, True)
    await redis_client.flushdb()  # what a rollback to before both submits leaves of them: nothing
    await register_worker(redis_client, image_input=True, max_steps=10)
    await journal.sweep()
    assert (journal.resubmitted, journal.inputs_restored) == (2, 1)
    claimed = [(await claim_next(redis_client, worker)).job for worker in ("wa", "wb")]  # one each
    jobs = {job.id: job for job in claimed}
    restored = await load_inputs(jobs[second], None, redis_client)
    assert np.array_equal(restored.image, np.asarray(gradient(64, 64)))
    with pytest.raises(InputsUnavailable, match="Redis lost them"):
        await load_inputs(jobs[first], None, redis_client)
    for job_id in (first, second):
        await redis_client.hset(KEYS.job(job_id), "status", "failed")  # ended (how is not the point here)
    await journal.sweep()
    assert (len(journal), journal.input_bytes) == (0, 0)


async def test_a_worker_gives_back_only_a_job_whose_record_its_own_start_made_from_nothing(
    redis_client: aioredis.Redis,
) -> None:
    """The unstart script: a record that holds the job (Redis did not lose it; its inputs expired) stays, and the job
    fails as before; one that the start made again after Redis lost the job is removed, its entry acknowledged; a
    second run changes nothing."""
    queue = Queue.of(redis_client, KEYS)
    await queue.streams.ensure_group(KEYS.size_stream(SHAPE.size))
    await queue.jobs.submit(make_job("kept"), KEYS.size_stream(SHAPE.size))
    claimed = await claim_next(redis_client)
    assert await queue.delivery.start(claimed, "w1") is not None
    assert not await queue.delivery.give_back_lost(claimed)
    assert await queue.jobs.job_status("kept") == "running"
    await redis_client.delete(KEYS.job("kept"), KEYS.attempts("kept"))  # lost by Redis: the worker starts it after
    assert await queue.delivery.start(claimed, "w1") is not None
    assert await queue.delivery.give_back_lost(claimed)
    assert await redis_client.exists(KEYS.job("kept"), KEYS.attempts("kept")) == 0
    assert await queue.streams.depth() == 0  # acknowledged
    assert not await queue.delivery.give_back_lost(claimed)


def test_the_journal_input_bytes_flag_reaches_the_config_and_is_bounded() -> None:
    assert gateway_config(build_parser().parse_args(["gateway", "--journal-input-bytes", "0"])).journal_input_bytes == 0
    with pytest.raises(ConfigError, match="--journal-input-bytes"):
        gateway_config(build_parser().parse_args(["gateway", "--journal-input-bytes", "-1"]))


async def until_worker_state(redis_client: aioredis.Redis, state: str, job_id: str) -> None:
    """Until the one worker under OUTAGE says `state`, or `job_id` has a result (then the caller's check fails)."""
    registry, store = Registry(redis_client, OUTAGE), JobStore(redis_client, OUTAGE)
    async with asyncio.timeout(WAIT_S):
        while [w.state for w in await registry.workers()] != [state]:
            if await store.fetch_meta(job_id) is not None:
                return
            await asyncio.sleep(0.05)  # a registry entry has no event to wait on


async def finished(redis_client: aioredis.Redis, job_id: str, keys: RedisKeys = OUTAGE) -> JobResult:
    """The job's result, once announced on the completions channel."""
    store = JobStore(redis_client, keys)
    async with redis_client.pubsub() as completions:
        await completions.subscribe(keys.completions_channel)
        async with asyncio.timeout(WAIT_S):
            while (result := await store.fetch_meta(job_id)) is None:
                await completions.get_message(ignore_subscribe_messages=True, timeout=1.0)
    return result


async def test_multipart_takes_one_file_per_image_field_and_the_list_name_browsers_send(
    client: Client, redis_client: aioredis.Redis, able_worker: None
) -> None:
    data = aiohttp.FormData()
    data.add_field("prompt", "a cat")
    for _ in range(2):
        data.add_field("image", IMAGE, filename="a.png", content_type="image/png")
    response = await client.post("/v1/jobs", data=data)
    error = await error_of(response)
    assert response.status == 400 and (error["field"], error["code"]) == ("image", "one_image")
    data = aiohttp.FormData()
    data.add_field("prompt", "a cat")
    data.add_field("strength", "0.5")
    data.add_field("image[]", IMAGE, filename="a.png", content_type="image/png")
    assert (await client.post("/v1/jobs", data=data)).status == 202
    assert (await queued(redis_client)).inputs is not None


async def test_the_openapi_document_offers_multipart_where_images_are_taken(client: Client) -> None:
    paths = (await (await client.get("/openapi.json")).json())["paths"]
    for path in ("/v1/jobs", "/v1/generate", "/v1/images/edits"):
        content = paths[path]["post"]["requestBody"]["content"]
        assert set(content) == {"application/json", "multipart/form-data"}, path
    assert set(paths["/v1/images/generations"]["post"]["requestBody"]["content"]) == {"application/json"}
