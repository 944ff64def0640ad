"""What the tests share besides fixtures (those are in conftest.py): the shapes the test workers serve, their
command lines, and helpers that play a worker's or a client's part against a real Redis and gateway.

Four virtual CPU devices stand in for a TPU v5e-4 (conftest.py sets XLA_FLAGS before anything imports JAX).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from common.protocol import DEFAULT_SCHEDULER, DEFAULT_STEPS, Shape
from common.rediskeys import RedisKeys
from common.registry import Registry, WorkerInfo, WorkerState
from common.streams import JobStreams

# ProcessGroup and RedisProcess are re-exported: the tests take them with the fixtures that hand them out.
from testkit import ProcessGroup as ProcessGroup
from testkit import RedisProcess, worker_args
from testkit.jobs import succeeded
from worker.delivery import ClaimedJob, Delivery

# Two step counts, so tests can tell a compiled shape from one that is not.
TEST_SHAPES = (Shape(width=64, height=64, steps=2), Shape(width=64, height=64, steps=3))
# What the test workers serve: the shapes' size at 1 to their most steps, their first's steps by default.
TEST_SIZE = TEST_SHAPES[0].size
TEST_MAX_STEPS = max(shape.steps for shape in TEST_SHAPES)
READY_TIMEOUT_S = 240.0

# The session's redis-server, as the tests' annotations name it.
RedisServer = RedisProcess
# pytest-aiohttp's `aiohttp_client` fixture: an app in, a test client on it out.
ClientFactory = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def tiny_worker_args(redis_url: str, model: Path, worker_id: str, *flags: str) -> list[str]:
    """`sdxl-serve` arguments of a test worker on the tiny model: TEST_SHAPES' size, up to their most steps."""
    return worker_args(
        redis_url, model, worker_id, *flags, size=str(TEST_SIZE), max_steps=TEST_MAX_STEPS,
        default_steps=TEST_SHAPES[0].steps,
    )  # fmt: skip


@dataclass(frozen=True)
class Cluster:
    """A running gateway and two warm workers on database 1 of the session's Redis."""

    url: str
    redis_url: str
    worker_ids: tuple[str, ...]


async def wait_ready(redis_url: str, count: int, prefix: str = "sdxl") -> list[WorkerInfo]:
    """Until `count` workers under `prefix` are registered ready (TimeoutError past READY_TIMEOUT_S)."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        return await Registry(client, RedisKeys(prefix)).wait_for_ready(count, READY_TIMEOUT_S)
    finally:
        await client.aclose()


async def scrape(session: aiohttp.ClientSession, url: str) -> Samples:
    """Every sample of a Prometheus `/metrics` page, keyed by name and sorted labels."""
    async with session.get(f"{url}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def post_generate(url: str, **body: Any) -> dict[str, Any]:
    """POST /v1/generate (prompt defaulted) and return the body of its 200 answer."""
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/v1/generate", json={"prompt": "a red fox", **body}) as response:
            payload: dict[str, Any] = await response.json()
            assert response.status == 200, payload
            return payload


# What an Idempotency-Key of this request was bound to before requests had `n` (sha256 of its validated body).
OLD_REQUEST: dict[str, Any] = {"prompt": "a red fox", "seed": 7, "num_inference_steps": 3}
OLD_FINGERPRINT = "549bb50c233a9e579f68632adcb7e77a0202e3225b5146c03aa65e25c47ecd67"


def worker_info(worker_id: str, *shapes: Shape, state: WorkerState = "ready", **serves: Any) -> WorkerInfo:
    """A worker's registry entry as it publishes it: serving the sizes of `shapes` at up to their most steps (the
    first shape's by default), Euler only; `serves` overrides those (`max_steps=50`, `schedulers=[...]`)."""
    served: dict[str, Any] = {
        "sizes": list(dict.fromkeys(s.size for s in shapes)),
        "max_steps": max((s.steps for s in shapes), default=0),
        "default_steps": shapes[0].steps if shapes else DEFAULT_STEPS,
        "schedulers": [DEFAULT_SCHEDULER],
        "images_per_request": 4,
    }
    return WorkerInfo(
        id=worker_id, host="h", pid=1, model="m", state=state, started_at=time.time(),
        **(served | serves),
    )  # fmt: skip


async def register_worker(
    redis_client: aioredis.Redis,
    worker_id: str = "w1",
    state: WorkerState = "ready",
    shapes: tuple[Shape, ...] = TEST_SHAPES,
    **serves: Any,
) -> None:
    """Register a worker serving `shapes` with its streams, so the gateway accepts requests for them (see
    `worker_info`)."""
    info = worker_info(worker_id, *shapes, state=state, **serves)
    streams = JobStreams(redis_client, RedisKeys())
    for stream in worker_streams(worker_id, shapes):
        await streams.ensure_group(stream)
    await Registry(redis_client, RedisKeys()).publish(info, ttl_s=60)


def worker_streams(worker_id: str = "test-worker", shapes: tuple[Shape, ...] = TEST_SHAPES) -> list[str]:
    """The streams a worker reads, in its order: its own, then one per size."""
    keys = RedisKeys()
    return [keys.worker_stream(worker_id), *(keys.size_stream(size) for size in dict.fromkeys(s.size for s in shapes))]


async def queued_jobs(redis_client: aioredis.Redis) -> int:
    """Jobs on any stream (queued or in service)."""
    return await JobStreams(redis_client, RedisKeys()).depth()


async def claim_next(
    redis_client: aioredis.Redis, worker_id: str = "test-worker", shapes: tuple[Shape, ...] = TEST_SHAPES
) -> ClaimedJob:
    """Claim the next job as a worker serving `shapes` would, waiting for one to be queued."""
    streams, delivery = JobStreams(redis_client, RedisKeys()), Delivery(redis_client, RedisKeys())
    for stream in worker_streams(worker_id, shapes):
        await streams.ensure_group(stream)
    claimed = None
    while claimed is None:
        claimed = await delivery.claim(worker_id, worker_streams(worker_id, shapes), block_ms=1000)
    return claimed


async def finish(
    redis_client: aioredis.Redis,
    claimed: ClaimedJob,
    images: list[bytes],
    media_type: str = "image/png",
    worker_id: str = "test-worker",
) -> bool:
    """Store a successful result for a claimed job, as a worker would."""
    result = succeeded(claimed.job, worker_id, len(images), media_type=media_type)
    return await Delivery(redis_client, RedisKeys()).complete(claimed, result, images)


async def play_worker(redis_client: aioredis.Redis, images: list[bytes]) -> None:
    """Claim the next job and store a successful result, as a worker would."""
    await finish(redis_client, await claim_next(redis_client), images)


async def read_events(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """Parse an SSE stream into (event, data) pairs, ignoring pings."""
    name, data = "message", ""
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if line.startswith("event:"):
            name = line.partition(":")[2].strip()
        elif line.startswith("data:"):
            data += line.partition(":")[2].strip()
        elif not line and data:
            yield name, json.loads(data)
            name, data = "message", ""
