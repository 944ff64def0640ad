"""The worker registry on a real redis-server."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import redis.asyncio as aioredis

from common.rediskeys import RedisKeys
from common.registry import Registry, WorkerInfo, WorkerState
from tests.support import TEST_SHAPES, worker_info

KEYS = RedisKeys()


def info(worker_id: str, state: WorkerState = "warming") -> WorkerInfo:
    return worker_info(worker_id, TEST_SHAPES[0], state=state)


async def test_published_workers_are_listed_and_removed(redis_client: aioredis.Redis) -> None:
    registry = Registry(redis_client, KEYS)
    await registry.publish(info("b"), ttl_s=10)
    await registry.publish(info("a", "ready"), ttl_s=10)
    assert [(w.id, w.state) for w in await registry.workers()] == [("a", "ready"), ("b", "warming")]
    await registry.remove("a")
    assert [w.id for w in await registry.workers()] == ["b"]


async def test_expired_worker_disappears_and_is_pruned_from_index(redis_client: aioredis.Redis) -> None:
    registry = Registry(redis_client, KEYS)
    await registry.publish(info("gone"), ttl_s=10)
    await redis_client.delete(KEYS.worker("gone"))  # what expiry does when heartbeats stop
    assert await registry.workers() == []
    assert await redis_client.zcard(KEYS.workers_index) == 0


async def test_wait_for_ready_returns_when_enough_workers_serve(redis_client: aioredis.Redis) -> None:
    registry = Registry(redis_client, KEYS)
    await registry.publish(info("a", "ready"), ttl_s=10)
    waiting = asyncio.create_task(registry.wait_for_ready(2, timeout_s=10))
    await registry.publish(info("b", "warming"), ttl_s=10)
    await asyncio.sleep(0)
    assert not waiting.done()
    await registry.publish(info("b", "ready"), ttl_s=10)
    ready = await waiting
    assert sorted(w.id for w in ready) == ["a", "b"]


async def test_wait_for_ready_times_out(redis_client: aioredis.Redis) -> None:
    registry = Registry(redis_client, KEYS)
    await registry.publish(info("a", "warming"), ttl_s=10)
    with pytest.raises(TimeoutError):
        await registry.wait_for_ready(1, timeout_s=0.3)


async def test_an_entry_from_a_version_without_random_weights_still_parses(redis_client: aioredis.Redis) -> None:
    old = info("w-old").model_dump(mode="json")
    del old["random_weights"]
    await redis_client.set(KEYS.worker("w-old"), json.dumps(old))
    await redis_client.zadd(KEYS.workers_index, {"w-old": time.time()})
    (listed,) = await Registry(redis_client, KEYS).workers()
    assert (listed.id, listed.random_weights) == ("w-old", False)


@pytest.mark.parametrize(
    ("image_input", "kinds"),
    [(True, ["text-to-image", "image-to-image", "inpainting"]), (False, ["text-to-image"])],
)
async def test_an_entry_from_a_version_without_request_kinds_reads_as_its_image_input_meant(
    image_input: bool, kinds: list[str], redis_client: aioredis.Redis
) -> None:
    old = info("w-old", "ready").model_dump(mode="json") | {"image_input": image_input}
    del old["request_kinds"]
    await redis_client.set(KEYS.worker("w-old"), json.dumps(old))
    await redis_client.zadd(KEYS.workers_index, {"w-old": time.time()})
    (listed,) = await Registry(redis_client, KEYS).workers()
    assert (listed.image_input, listed.request_kinds) == (image_input, kinds)


async def test_an_inpainting_workers_kinds_travel_through_the_registry(redis_client: aioredis.Redis) -> None:
    entry = worker_info("w-inpaint", TEST_SHAPES[0], image_input=True, request_kinds=["inpainting"])
    await Registry(redis_client, KEYS).publish(entry, ttl_s=60)
    (listed,) = await Registry(redis_client, KEYS).workers()
    assert (listed.image_input, listed.request_kinds) == (True, ["inpainting"])
