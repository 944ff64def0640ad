"""`POST /v1/images/generations` over real HTTP and a real redis-server, driven by the official `openai` client
where it matters; a test plays the worker."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from common.jobstore import JobStore, Submitter
from common.protocol import SDXL_RESOLUTIONS, GenerationParams, Job, Shape
from common.rediskeys import RedisKeys
from gateway.auth import Caller
from gateway.openai_api import ImageGenerationRequest, to_generate_request
from tests.support import OLD_FINGERPRINT, OLD_REQUEST, TEST_SHAPES, claim_next, finish, queued_jobs, register_worker

KEYS = RedisKeys()
ROUTE = "/v1/images/generations"
IMAGES = [f"png-{k}".encode() for k in range(4)]
CAT = {"prompt": "a cat"}


async def serve_one(redis_client: aioredis.Redis, images: list[bytes], media_type: str = "image/png") -> Job:
    """Play the worker for the next job and return the job as it was queued."""
    claimed = await claim_next(redis_client)
    await finish(redis_client, claimed, images, media_type=media_type)
    return claimed.job


@pytest.fixture
async def oai(client: TestClient[Any, Any]) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official client pointed at the test gateway; no retries, so a refused request is answered once."""
    async with openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0) as oai:
        yield oai


async def test_openai_client_gets_the_workers_images_as_b64_json(
    oai: openai.AsyncOpenAI, redis_client: aioredis.Redis, fake_worker: None
) -> None:
    worker = asyncio.create_task(serve_one(redis_client, IMAGES))
    response = await oai.images.generate(prompt="a red fox", n=2, size="64x64", response_format="b64_json")
    job = await worker
    assert response.data is not None and len(response.data) == 2
    assert [base64.b64decode(image.b64_json or "") for image in response.data] == IMAGES[:2]
    assert all(image.url is None and image.revised_prompt is None for image in response.data)
    assert (response.size, response.output_format, response.created > 0) == ("64x64", "png", True)
    assert (job.params.prompt, job.params.shape, job.output_format) == ("a red fox", TEST_SHAPES[0], "png")
    assert job.params.n == 2  # made with n images, none discarded


async def test_url_format_gives_absolute_urls_to_the_images(
    client: TestClient[Any, Any], redis_client: aioredis.Redis, fake_worker: None
) -> None:
    images = [f"jpeg-{k}".encode() for k in range(4)]
    worker = asyncio.create_task(serve_one(redis_client, images, media_type="image/jpeg"))
    response = await client.post(
        ROUTE,
        json={
            "prompt": "a cat",
            "n": 3,
            "output_format": "jpeg",
            "output_compression": 50,
            "num_inference_steps": 3,
            "seed": 7,
        },
    )
    job = await worker
    assert response.status == 200
    body = await response.json()
    assert set(body) == {"created", "data", "output_format", "size"} and body["output_format"] == "jpeg"
    assert (job.quality, job.params.seed, job.params.shape.steps) == (50, 7, 3)
    urls = [item["url"] for item in body["data"]]
    paths = [f"{client.make_url('')}/v1/jobs/{job.id}/images/{k}?" for k in range(3)]
    assert all(url.startswith(path) for url, path in zip(urls, paths, strict=True))
    for url, image in zip(urls, images, strict=False):
        async with client.session.get(url) as fetched:  # the absolute URL, as an OpenAI client would use it
            assert fetched.status == 200 and fetched.content_type == "image/jpeg"
            assert await fetched.read() == image


async def test_openai_sizes_and_a_scheduler_reach_a_worker_serving_sdxl_sizes(
    oai: openai.AsyncOpenAI, redis_client: aioredis.Redis
) -> None:
    sdxl = tuple(Shape(width=width, height=height, steps=20) for width, height in SDXL_RESOLUTIONS)
    await register_worker(redis_client, shapes=sdxl, max_steps=50, schedulers=["euler", "euler_trailing"])
    worker = asyncio.create_task(claim_next(redis_client, shapes=sdxl))
    response = oai.images.generate(
        prompt="a cat", size="1536x1024", extra_body={"scheduler": "euler_trailing", "num_inference_steps": 4}
    )
    answered = asyncio.create_task(response)
    claimed = await worker
    await finish(redis_client, claimed, IMAGES)
    assert (await answered).size == "1216x832"
    assert (str(claimed.job.params.shape), claimed.job.params.scheduler) == ("1216x832x4", "euler_trailing")


async def test_ignored_openai_parameters_are_accepted(
    oai: openai.AsyncOpenAI, redis_client: aioredis.Redis, fake_worker: None
) -> None:
    worker = asyncio.create_task(serve_one(redis_client, IMAGES))
    response = await oai.images.generate(
        prompt="a cat", model="dall-e-3", user="someone", quality="hd", style="vivid", size="auto", n=None
    )
    job = await worker
    assert response.data is not None and len(response.data) == 1 and response.data[0].url is not None
    assert job.params.shape == TEST_SHAPES[0]  # size auto: the cluster's default
    assert job.params.n == 1  # OpenAI's default


async def test_idempotency_key_refers_to_the_first_job(
    client: TestClient[Any, Any], redis_client: aioredis.Redis, fake_worker: None
) -> None:
    request: dict[str, Any] = {
        "json": {"prompt": "a cat", "response_format": "b64_json"},
        "headers": {"Idempotency-Key": "k1"},
    }
    worker = asyncio.create_task(serve_one(redis_client, IMAGES))
    first = await (await client.post(ROUTE, **request)).json()
    await worker
    again = await client.post(ROUTE, **request)  # nobody plays the worker now: a new job would time out
    assert again.status == 200 and (await again.json())["data"] == first["data"]


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({}, "prompt", "missing"),
        ({"prompt": "  "}, "prompt", "value_error"),
        ({**CAT, "size": "64by64"}, "size", "value_error"),
        ({**CAT, "size": "60x64"}, "size", "multiple_of"),
        ({**CAT, "size": "128x128"}, "size", "unsupported_size"),
        ({**CAT, "num_inference_steps": 25}, "num_inference_steps", "unsupported_steps"),
        ({**CAT, "scheduler": "ddim"}, "scheduler", "literal_error"),
        ({**CAT, "scheduler": "euler_trailing"}, "scheduler", "unsupported_scheduler"),
        ({**CAT, "n": 0}, "n", "greater_than_equal"),
        ({**CAT, "n": 5}, "n", "less_than_equal"),
        ({**CAT, "n": 11}, "n", "less_than_equal"),
        ({**CAT, "n": "2"}, "n", "int_type"),
        ({**CAT, "response_format": "png"}, "response_format", "literal_error"),
        ({**CAT, "quality": "ultra"}, "quality", "literal_error"),
        ({**CAT, "unknown": 1}, "unknown", "extra_forbidden"),
        ({**CAT, "width": 64}, "width", "extra_forbidden"),  # OpenAI's name for the size is `size`
        ({**CAT, "height": None}, "height", "extra_forbidden"),
        ({**CAT, "output_compression": 50}, "output_compression", "value_error"),
        ({**CAT, "output_format": "png", "output_compression": 50}, "output_compression", "value_error"),
    ],
)
async def test_bad_input_is_400_in_openai_shape_before_the_queue(
    client: TestClient[Any, Any],
    redis_client: aioredis.Redis,
    fake_worker: None,
    body: dict[str, Any],
    param: str,
    code: str,
) -> None:
    response = await client.post(ROUTE, json=body)
    assert response.status == 400
    error = (await response.json())["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    assert await queued_jobs(redis_client) == 0


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"size": "64by64"}, "size"),
        ({"n": 0}, "n"),
        ({"n": 5}, "n"),
        ({"response_format": "png"}, "response_format"),
        ({"extra_body": {"unknown": 1}}, "unknown"),
        ({"output_format": "png", "output_compression": 50}, "output_compression"),
    ],
)
async def test_openai_client_raises_bad_request_naming_the_param(
    oai: openai.AsyncOpenAI, redis_client: aioredis.Redis, fake_worker: None, kwargs: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await oai.images.generate(prompt="a cat", **kwargs)
    assert (caught.value.status_code, caught.value.param, caught.value.type) == (400, param, "invalid_request_error")
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == param
    assert await queued_jobs(redis_client) == 0


async def test_no_worker_is_503_in_openai_shape(
    client: TestClient[Any, Any], oai: openai.AsyncOpenAI, redis_client: aioredis.Redis
) -> None:
    response = await client.post(ROUTE, json={"prompt": "a cat"})
    assert response.status == 503 and response.headers["Retry-After"]
    error = (await response.json())["error"]
    assert (error["type"], error["code"], error["param"]) == ("server_error", "no_workers", None)
    with pytest.raises(openai.InternalServerError) as caught:
        await oai.images.generate(prompt="a cat")
    assert (caught.value.status_code, caught.value.code) == (503, "no_workers")
    assert await queued_jobs(redis_client) == 0


async def test_deadline_is_504_with_the_jobs_absolute_url_in_the_message(
    client: TestClient[Any, Any], redis_client: aioredis.Redis, fake_worker: None
) -> None:
    response = await client.post(ROUTE, json={"prompt": "a cat"})  # nobody plays the worker
    assert response.status == 504
    error = (await response.json())["error"]
    assert (error["type"], error["code"]) == ("server_error", "timeout")
    status_url = error["message"].rpartition(": ")[2]
    assert status_url.startswith(f"{client.make_url('')}/v1/jobs/")
    async with client.session.get(status_url) as state:
        assert (await state.json())["status"] == "queued"


async def test_openapi_documents_the_openai_schemas(client: TestClient[Any, Any]) -> None:
    document = await (await client.get("/openapi.json")).json()
    operation = document["paths"][ROUTE]["post"]
    assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ImageGenerationRequest")
    assert operation["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/OpenAIErrorResponse"
    )
    request = document["components"]["schemas"]["ImageGenerationRequest"]
    assert request["required"] == ["prompt"] and request["additionalProperties"] is False
    assert {"n", "size", "response_format", "output_compression", "seed"} <= set(request["properties"])


async def test_the_openai_client_does_not_retry_a_504_into_a_second_job(
    client: TestClient[Any, Any], redis_client: aioredis.Redis, fake_worker: None
) -> None:
    # The client retries 5xx answers by default; after a 504 the job is still queued, so a retry would
    # queue another. The gateway tells it not to (x-should-retry: false).
    async with openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused", max_retries=2) as oai:
        with pytest.raises(openai.APIStatusError) as caught:
            await oai.images.generate(prompt="a cat")
    assert caught.value.status_code == 504
    assert await queued_jobs(redis_client) == 1


@pytest.mark.parametrize(
    ("size", "served", "made"),
    [
        ("1536x1024", (), (1216, 832)),
        ("1024x1792", (), (768, 1344)),
        ("512x512", (), (1024, 1024)),
        ("512x512", ((512, 512),), (512, 512)),
        ("256x256", ((256, 256), (1024, 1024)), (256, 256)),
        ("1536x1024", ((1536, 1024),), (1536, 1024)),
        ("64x64", (), (64, 64)),
    ],
)
def test_openai_sizes_are_kept_where_served_else_map_onto_sdxl_trained_resolutions(
    size: str, served: tuple[tuple[int, int], ...], made: tuple[int, int]
) -> None:
    """An OpenAI size a worker serves is made as asked; one none serves becomes the SDXL trained resolution of
    the nearest aspect ratio; any other size is kept."""
    generate = to_generate_request(ImageGenerationRequest.model_validate({**CAT, "size": size}), served)
    assert (generate.width, generate.height) == made


def test_every_generation_parameter_reaches_the_native_request_under_its_own_name_but_the_size() -> None:
    """The OpenAI body is built on GenerationParams: a new generation parameter is accepted here and passed on
    without touching the mapping; only width and height go by OpenAI's name, `size`."""
    extensions = set(GenerationParams.model_fields) - {"width", "height"}
    properties = set(ImageGenerationRequest.model_json_schema()["properties"])
    assert extensions <= properties and not {"width", "height"} & properties
    body = ImageGenerationRequest.model_validate(
        {
            **CAT,
            "negative_prompt": "fog",
            "seed": 3,
            "guidance_scale": 2.5,
            "num_inference_steps": 4,
            "scheduler": "dpmpp_2m_karras",
            "size": "64x96",
            "n": 3,  # named: an unnamed n stays unnamed (the route's default applies to the job)
        }
    )
    generate = to_generate_request(body)
    assert generate.model_dump(include=extensions) == body.model_dump(include=extensions)
    assert (generate.width, generate.height) == (64, 96)


@pytest.mark.parametrize(
    ("model", "inline"), [("gpt-image-1", True), ("gpt-image-1-mini", True), ("dall-e-3", False), (None, False)]
)
async def test_the_default_response_format_follows_the_model_as_at_openai(
    oai: openai.AsyncOpenAI, redis_client: aioredis.Redis, fake_worker: None, model: str | None, inline: bool
) -> None:
    worker = asyncio.create_task(serve_one(redis_client, IMAGES))
    response = await oai.images.generate(prompt="a cat", model=model if model else openai.omit)
    await worker
    assert response.data is not None and len(response.data) == 1
    image = response.data[0]
    assert (image.b64_json is not None, image.url is None) == (inline, inline)
    if inline:
        assert base64.b64decode(image.b64_json or "") == IMAGES[0]


async def test_a_worker_serving_256x256_makes_a_requested_256x256(
    oai: openai.AsyncOpenAI, redis_client: aioredis.Redis
) -> None:
    shapes = (Shape(width=1024, height=1024, steps=4), Shape(width=256, height=256, steps=4))
    await register_worker(redis_client, shapes=shapes)
    worker = asyncio.create_task(claim_next(redis_client, shapes=shapes))
    answered = asyncio.create_task(oai.images.generate(prompt="a cat", size="256x256", model="dall-e-2"))
    claimed = await worker
    await finish(redis_client, claimed, IMAGES)
    assert ((await answered).size, str(claimed.job.params.shape.size)) == ("256x256", "256x256")


async def test_gpt_image_fields_are_accepted(
    oai: openai.AsyncOpenAI, redis_client: aioredis.Redis, fake_worker: None
) -> None:
    worker = asyncio.create_task(serve_one(redis_client, IMAGES, media_type="image/webp"))
    response = await oai.images.generate(
        prompt="a cat",
        model="gpt-image-1",
        background="opaque",
        moderation="low",
        quality="high",
        output_format="webp",
        output_compression=70,
        partial_images=0,
        user="someone",
        safety_identifier="someone-else",
        stream=False,
    )
    job = await worker
    assert response.output_format == "webp" and response.data is not None and response.data[0].b64_json
    assert (job.output_format, job.quality) == ("webp", 70)


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({**CAT, "stream": True}, "stream", "streaming is not supported"),
        ({**CAT, "background": "transparent"}, "background", "transparent backgrounds are not supported"),
        ({**CAT, "webhook": "https://example.com/hook"}, "webhook", "takes an object with url"),
    ],
)
async def test_unsupported_openai_features_are_400_naming_them(
    client: TestClient[Any, Any],
    redis_client: aioredis.Redis,
    fake_worker: None,
    body: dict[str, Any],
    param: str,
    words: str,
) -> None:
    response = await client.post(ROUTE, json=body)
    error = (await response.json())["error"]
    assert (response.status, error["param"], error["type"]) == (400, param, "invalid_request_error")
    assert words in error["message"]
    assert await queued_jobs(redis_client) == 0


async def test_the_openai_client_is_told_streaming_is_not_supported(
    oai: openai.AsyncOpenAI, redis_client: aioredis.Redis, fake_worker: None
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await oai.images.generate(prompt="a cat", model="gpt-image-1", stream=True)
    assert caught.value.param == "stream" and "not supported" in caught.value.message
    assert await queued_jobs(redis_client) == 0


async def test_an_unnamed_n_makes_one_image_and_keeps_a_key_stored_before_requests_had_n(
    client: TestClient[Any, Any], redis_client: aioredis.Redis, fake_worker: None
) -> None:
    # A job queued under an Idempotency-Key before requests had `n`: its fingerprint did not name it.
    body = OLD_REQUEST
    old = Job(
        id="before-n", params=GenerationParams.model_validate(body).resolved(TEST_SHAPES[0], seed=7), result_ttl_s=60
    )
    caller = Submitter(scope=Caller("address", "127.0.0.1").scope)  # the test client, as the gateway sees it
    stream = KEYS.size_stream(TEST_SHAPES[0].size)
    await JobStore(redis_client, KEYS).submit(old, stream, "old-key", OLD_FINGERPRINT, submitter=caller)
    await finish(redis_client, await claim_next(redis_client), IMAGES)
    retry = await client.post(
        ROUTE, json={**body, "response_format": "b64_json"}, headers={"Idempotency-Key": "old-key"}
    )
    assert retry.status == 200 and retry.headers["Idempotent-Replayed"] == "true"
    assert len((await retry.json())["data"]) == 1
    worker = asyncio.create_task(serve_one(redis_client, IMAGES[:1]))
    fresh = await client.post(ROUTE, json={**body, "response_format": "b64_json"})
    assert (await worker).params.n == 1 and len((await fresh.json())["data"]) == 1
