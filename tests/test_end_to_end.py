"""The whole request path on real parts: HTTP gateway process, redis-server, worker processes, tiny model."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import redis.asyncio as aioredis
from PIL import Image

from common.jobstore import JobStore
from common.protocol import SCHEDULERS, Job
from common.rediskeys import RedisKeys
from common.registry import WorkerInfo
from gateway.listener import JobListener
from tests.queues import Queue
from tests.support import (
    TEST_SHAPES,
    Cluster,
    ProcessGroup,
    RedisServer,
    post_generate,
    read_events,
    tiny_worker_args,
    wait_ready,
)

pytestmark = pytest.mark.e2e


async def generate(cluster: Cluster, **body: Any) -> dict[str, Any]:
    return await post_generate(cluster.url, **body)


def decode(payload: dict[str, Any]) -> list[np.ndarray]:
    images = []
    for encoded in payload["images"]:
        image = Image.open(io.BytesIO(base64.b64decode(encoded)))
        assert image.format == "PNG" and image.mode == "RGB"
        images.append(np.asarray(image))
    return images


async def test_four_distinct_pngs_of_the_requested_size(cluster: Cluster) -> None:
    shape = TEST_SHAPES[1]
    payload = await generate(cluster, seed=11, width=shape.width, height=shape.height, num_inference_steps=shape.steps)
    images = decode(payload)
    assert len(images) == 4
    assert all(image.shape == (shape.height, shape.width, 3) for image in images)
    assert len({image.tobytes() for image in images}) == 4
    assert payload["seed"] == 11 and payload["worker"] in cluster.worker_ids
    assert payload["scheduler"] == "euler"
    timings = payload["timings"]
    assert timings["total_ms"] >= timings["generate_ms"] > 0 and timings["queued_ms"] >= 0


async def test_models_lists_what_the_real_workers_serve(cluster: Cluster) -> None:
    async with aiohttp.ClientSession() as session, session.get(f"{cluster.url}/v1/models") as response:
        (card,) = (await response.json())["data"]
    served = {k: card[k] for k in ("sizes", "min_steps", "max_steps", "default_steps", "schedulers")}
    expected = {"sizes": ["64x64"], "min_steps": 1, "max_steps": 3, "default_steps": 2}
    assert served == {**expected, "schedulers": list(SCHEDULERS)}
    assert card["random_weights"] is True  # the tiny model's workers say its images are noise


async def test_same_seed_same_images_other_seed_other_images(cluster: Cluster) -> None:
    """One after the other, each request alone in its worker's batch: the same batch shape, so the same bytes,
    whichever worker served each. (Side by side in one batch, a request may run at a larger bucket and round
    differently: docs/engine.md; tests/test_engine.py checks the bit-for-bit claim at the same bucket.)"""
    first = await generate(cluster, seed=5)
    again = await generate(cluster, seed=5)
    other = await generate(cluster, seed=6)
    assert first["images"] == again["images"]
    assert not set(first["images"]) & set(other["images"])


async def test_missing_seed_is_drawn_and_returned(cluster: Cluster) -> None:
    drawn = await generate(cluster)
    replay = await generate(cluster, seed=drawn["seed"])
    assert replay["images"] == drawn["images"]


async def test_job_api_streams_every_step_from_the_compiled_loop(cluster: Cluster) -> None:
    steps = TEST_SHAPES[1].steps
    async with aiohttp.ClientSession(base_url=cluster.url) as session:
        async with session.post(
            "/v1/jobs",
            json={
                "prompt": "a lighthouse",
                "seed": 11,
                "num_inference_steps": steps,
                "output_format": "webp",
                "quality": 80,
            },
        ) as response:
            assert response.status == 202
            accepted = await response.json()
        async with session.get(accepted["events_url"]) as stream:
            events = [event async for event in read_events(stream)]
        names = [name for name, _ in events]
        assert names[names.index("started") :] == ["started"] + ["progress"] * steps + ["succeeded"]
        assert [data["step"] for name, data in events if name == "progress"] == list(range(1, steps + 1))
        result = events[-1][1]["result"]
        assert result["media_type"] == "image/webp" and len(result["images"]) == 4
        pixels = []
        for url in result["images"]:
            async with session.get(url) as image:
                assert image.content_type == "image/webp"
                decoded = Image.open(io.BytesIO(await image.read()))
                assert decoded.format == "WEBP" and decoded.size == (TEST_SHAPES[1].width, TEST_SHAPES[1].height)
                pixels.append(np.asarray(decoded))
    assert len({p.tobytes() for p in pixels}) == 4


async def test_jpeg_through_the_synchronous_route(cluster: Cluster) -> None:
    payload = await generate(cluster, prompt="a lighthouse", seed=3, output_format="jpeg", quality=70)
    formats = {Image.open(io.BytesIO(base64.b64decode(encoded))).format for encoded in payload["images"]}
    assert formats == {"JPEG"}


async def test_both_workers_serve_concurrent_requests(cluster: Cluster) -> None:
    served: set[str] = set()
    for _ in range(5):  # the group hands a new job to whichever worker is idle, so both get work
        payloads = await asyncio.gather(*(generate(cluster, seed=s) for s in range(6)))
        served |= {p["worker"] for p in payloads}
        if served == set(cluster.worker_ids):
            break
    assert served == set(cluster.worker_ids)


async def test_job_with_uncompiled_shape_fails_cleanly_and_worker_carries_on(cluster: Cluster) -> None:
    """A job that skipped the gateway's checks (never trust the queue) fails with a reason."""
    client = aioredis.Redis.from_url(cluster.redis_url)
    keys = RedisKeys()
    listener = JobListener(client, keys)
    listening = asyncio.create_task(listener.run())
    try:
        await asyncio.wait_for(listener.subscribed.wait(), 10)
        job = Job.model_validate(
            {
                "id": "uncompiled-1",
                "params": {
                    "prompt": "x",
                    "seed": 1,
                    "guidance_scale": 7.5,
                    "width": 64,
                    "height": 64,
                    "num_inference_steps": 9,
                    "scheduler": "euler",
                },
                "result_ttl_s": 60,
            }
        )
        done = listener.expect(job.id)
        # Injected straight into the shared stream of a shape the workers did compile.
        await JobStore(client, keys).submit(job, keys.size_stream(TEST_SHAPES[0].size))
        await asyncio.wait_for(done, 60)
        stored = await JobStore(client, keys).fetch_result(job.id)
        assert stored is not None and stored.result.status == "failed"
        assert stored.result.error is not None and "9 steps: this worker runs 1 to 3" in stored.result.error
    finally:
        listening.cancel()
        await client.aclose()
    assert len(decode(await generate(cluster, seed=1))) == 4


async def test_worker_takes_no_job_before_warm_up(
    redis_server: RedisServer, tiny_model: Path, processes: ProcessGroup
) -> None:
    """A job queued while the only worker warms up waits, and is claimed only after it says ready."""
    prefix, redis_url = "warmup-test", redis_server.url(2)
    client = aioredis.Redis.from_url(redis_url)
    keys = RedisKeys(prefix)
    queue = Queue.of(client, keys)
    stream = keys.size_stream(TEST_SHAPES[0].size)
    pubsub = client.pubsub()
    await pubsub.subscribe(keys.worker_events_channel)
    try:
        args = tiny_worker_args(redis_url, tiny_model, "warmup-worker", "--key-prefix", prefix)
        processes.start("warmup-worker", *args)
        first = await _next_worker_event(pubsub)
        assert first.state == "warming" and first.metrics_port
        async with aiohttp.ClientSession() as session:  # its own port says: alive, not ready
            async with session.get(f"http://127.0.0.1:{first.metrics_port}/healthz") as alive:
                assert alive.status == 200
            async with session.get(f"http://127.0.0.1:{first.metrics_port}/readyz") as ready:
                assert ready.status == 503 and "warming" in (await ready.json())["error"]["message"]
        job = Job.model_validate(
            {
                "id": "early-1",
                "params": {
                    "prompt": "x",
                    "seed": 1,
                    "guidance_scale": 7.5,
                    "width": TEST_SHAPES[0].width,
                    "height": TEST_SHAPES[0].height,
                    "num_inference_steps": TEST_SHAPES[0].steps,
                    "scheduler": "euler",
                },
                "result_ttl_s": 60,
            }
        )
        await queue.jobs.submit(job, stream)
        record = await queue.jobs.record(job.id)
        assert record is not None and record.entry_id is not None
        entry_id = record.entry_id
        # Still warming: the worker has not even created the group, so nobody holds the job.
        assert await client.xinfo_groups(stream) == []
        registered = await wait_ready(redis_url, 1, prefix)
        assert registered[0].ready_at is not None
        listener = JobListener(client, keys)
        done = listener.expect(job.id)
        listening = asyncio.create_task(listener.run())
        await asyncio.wait_for(done, 60)
        listening.cancel()
        stored = await queue.jobs.fetch_result(job.id)
        assert stored is not None and stored.result.status == "succeeded" and stored.result.timings
        # Claimed at: enqueue time (the entry id, Redis clock) plus the wait the worker measured.
        claimed_at_s = (int(entry_id.split("-")[0]) + stored.result.timings.queued_ms) / 1000
        assert claimed_at_s >= registered[0].ready_at - 0.01
    finally:
        await pubsub.aclose()
        await client.aclose()


async def _next_worker_event(pubsub: aioredis.client.PubSub) -> WorkerInfo:
    async with asyncio.timeout(120):
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=120)
            if message is not None:
                return WorkerInfo.model_validate_json(message["data"])


def png_of(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def picture(side: int = 64) -> np.ndarray:
    ramp = np.linspace(0, 255, side, dtype=np.uint8)
    return np.stack(
        [np.tile(ramp, (side, 1)), np.tile(ramp[:, None], (1, side)), np.full((side, side), 90, np.uint8)], -1
    )


async def test_image_to_image_on_the_real_engine_is_seeded_and_not_text_to_image(cluster: Cluster) -> None:
    """A real worker's row engine starts from the uploaded picture: the same picture, seed and strength give the same
    image; text to image from the same seed, and another strength, give others."""
    image = base64.b64encode(png_of(picture())).decode()
    body = {"seed": 4, "n": 1, "num_inference_steps": 3}
    first = await generate(cluster, **body, image=image, strength=0.7)
    again = await generate(cluster, **body, image=image, strength=0.7)
    assert first["images"] == again["images"]
    assert first["images"] != (await generate(cluster, **body))["images"]
    assert first["images"] != (await generate(cluster, **body, image=image, strength=1.0))["images"]
    assert decode(first)[0].shape == (64, 64, 3)


async def test_the_openai_clients_edit_inpaints_on_a_real_worker(cluster: Cluster) -> None:
    """`images.edit` of the official client, unchanged, against real workers: an image and its mask in, PNGs out."""
    import openai

    mask = np.full((64, 64, 4), 255, np.uint8)
    mask[16:48, 16:48, 3] = 0  # OpenAI's convention: the edited area is fully transparent
    async with openai.AsyncOpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0) as client:
        response = await client.images.edit(
            image=("picture.png", png_of(picture()), "image/png"),
            mask=("mask.png", png_of(mask), "image/png"),
            prompt="a red fox",
            n=2,
            response_format="b64_json",
        )
    assert response.data is not None and len(response.data) == 2
    for item in response.data:
        assert Image.open(io.BytesIO(base64.b64decode(item.b64_json or ""))).size == (64, 64)
