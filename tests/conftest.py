"""Fixtures: a real redis-server on a free port, the tiny model, and real worker and gateway processes.

Four virtual CPU devices stand in for a TPU v5e-4, in this process (pipeline tests) and in every
worker process the fixtures start.
"""

from __future__ import annotations

import os

# Before anything imports JAX: it reads XLA_FLAGS once.
os.environ["XLA_FLAGS"] = (
    " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)
    + " --xla_force_host_platform_device_count=4"
)

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from common.protocol import DEFAULT_SCHEDULER, DEFAULT_STEPS, JobResult, Shape, Timings
from common.rediskeys import RedisKeys
from common.registry import Registry, WorkerInfo
from common.streams import JobStreams
from gateway.app import create_app
from gateway.config import GatewayConfig

# ProcessGroup is re-exported: the end-to-end tests take it with the fixtures that hand it out.
from testkit import ProcessGroup as ProcessGroup
from testkit import RedisOptions, RedisProcess, free_port, redis_process, wait_http, write_tiny_model
from testkit.objectstore import S3Server, start_s3_server
from worker.delivery import ClaimedJob, Delivery

# Two step counts, so tests can tell a compiled shape from one that is not.
TEST_SHAPES = (Shape(width=64, height=64, steps=2), Shape(width=64, height=64, steps=3))
# What the test workers serve: the shapes' size at 1 to their most steps, their first's steps by default.
TEST_SIZE = TEST_SHAPES[0].size
TEST_MAX_STEPS = max(shape.steps for shape in TEST_SHAPES)
SERVING_ARGS = [
    "--sizes",
    str(TEST_SIZE),
    "--max-steps",
    str(TEST_MAX_STEPS),
    "--default-steps",
    str(TEST_SHAPES[0].steps),
]
READY_TIMEOUT_S = 240.0
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


@pytest.fixture(scope="session", autouse=True)
def compile_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One JAX compilation cache for every worker the session starts (they inherit the variable), kept out
    of the user's own cache; later workers of the same shapes start from it, as on a real host."""
    directory = tmp_path_factory.mktemp("jax-cache")
    previous = os.environ.get("SDXL_SERVE_COMPILE_CACHE")
    os.environ["SDXL_SERVE_COMPILE_CACHE"] = str(directory)
    yield directory
    if previous is None:
        os.environ.pop("SDXL_SERVE_COMPILE_CACHE", None)
    else:
        os.environ["SDXL_SERVE_COMPILE_CACHE"] = previous


# The session's redis-server, as the tests' annotations name it.
RedisServer = RedisProcess


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisProcess]:
    """One redis-server for the whole session, on a free loopback port, with AOF on."""
    with redis_process(RedisOptions(appendonly=True)) as server:
        yield server


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A client on database 0, flushed before each test. (The e2e cluster lives in database 1.)"""
    client = aioredis.Redis.from_url(redis_server.url(0))
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SDXL model, written once per session by the CLI, exactly as a user would."""
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sdxl")


def worker_args(redis_url: str, model: Path, worker_id: str, prefix: str = "sdxl") -> list[str]:
    return [
        "worker",
        "--redis-url",
        redis_url,
        "--key-prefix",
        prefix,
        "--model",
        str(model),
        *SERVING_ARGS,
        "--worker-id",
        worker_id,
        "--heartbeat-interval",
        "0.5",
    ]


@pytest.fixture(scope="session")
def processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessGroup]:
    group = ProcessGroup(tmp_path_factory.mktemp("logs"))
    yield group
    group.stop_all()


@dataclass(frozen=True)
class Cluster:
    """A running gateway and two warm workers on database 1 of the session's Redis."""

    url: str
    redis_url: str
    worker_ids: tuple[str, ...]


async def wait_ready(redis_url: str, count: int, prefix: str = "sdxl") -> list[WorkerInfo]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        return await Registry(client, RedisKeys(prefix)).wait_for_ready(count, READY_TIMEOUT_S)
    finally:
        await client.aclose()


@pytest.fixture(scope="session")
def cluster(redis_server: RedisServer, tiny_model: Path, processes: ProcessGroup) -> Cluster:
    """Gateway and workers as real processes, started once for the e2e tests."""
    redis_url = redis_server.url(1)
    redis.Redis.from_url(redis_url).flushdb()
    port = free_port()
    processes.start(
        "gateway",
        "gateway",
        "--redis-url",
        redis_url,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--request-timeout",
        "120",
    )
    worker_ids = ("worker-a", "worker-b")
    for worker_id in worker_ids:
        processes.start(worker_id, *worker_args(redis_url, tiny_model, worker_id))
    try:
        asyncio.run(wait_ready(redis_url, len(worker_ids)))
    except TimeoutError:
        pytest.fail("workers not ready:\n" + "\n".join(processes.log(w)[-3000:] for w in worker_ids))
    asyncio.run(wait_http(f"http://127.0.0.1:{port}/healthz", READY_TIMEOUT_S))
    return Cluster(url=f"http://127.0.0.1:{port}", redis_url=redis_url, worker_ids=worker_ids)


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


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


@pytest.fixture
def artifacts() -> Path:
    """A folder kept after the run (screenshots, logs) for people and CI to look at."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


# --- A gateway in this process (aiohttp test client), with a test playing the worker.

ClientFactory = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]


def served(shapes: tuple[Shape, ...]) -> dict[str, Any]:
    """The registry fields of a worker serving the sizes of `shapes` at up to their most steps (the first
    shape's by default), Euler only."""
    return {
        "sizes": list(dict.fromkeys(s.size for s in shapes)),
        "max_steps": max((s.steps for s in shapes), default=0),
        "default_steps": shapes[0].steps if shapes else DEFAULT_STEPS,
        "schedulers": [DEFAULT_SCHEDULER],
    }


async def register_worker(
    redis_client: aioredis.Redis,
    worker_id: str = "w1",
    state: str = "ready",
    shapes: tuple[Shape, ...] = TEST_SHAPES,
    **serves: Any,
) -> None:
    """Register a worker serving `shapes` with its streams, so the gateway accepts requests for them: the sizes
    of `shapes`, up to their most steps, Euler only, as a worker publishes them; `serves` overrides those
    (`max_steps=50`, `schedulers=[...]`)."""
    info = WorkerInfo(
        id=worker_id,
        host="h",
        pid=1,
        model="m",
        images_per_request=4,
        state=state,  # type: ignore[arg-type]
        started_at=time.time(),
        **(served(shapes) | serves),
    )
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


@pytest.fixture
async def client(
    redis_server: RedisServer, redis_client: aioredis.Redis, aiohttp_client: ClientFactory
) -> TestClient[Any, Any]:
    """A gateway on db 0 with a 1 s request timeout."""
    config = GatewayConfig(redis_url=redis_server.url(0), request_timeout_s=1.0, result_ttl_s=60)
    return await aiohttp_client(create_app(config))


@pytest.fixture
async def fake_worker(redis_client: aioredis.Redis) -> AsyncIterator[None]:
    await register_worker(redis_client)
    yield


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
    job = claimed.job
    result = JobResult(
        id=job.id,
        status="succeeded",
        worker=worker_id,
        seed=job.params.seed,
        shape=job.params.shape,
        scheduler=job.params.scheduler,
        media_type=media_type,
        image_count=len(images),
        timings=Timings(queued_ms=1.0, generate_ms=2.0, encode_ms=3.0),
    )
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


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 server (SeaweedFS) on free loopback ports, one per test module."""
    server = start_s3_server(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.close()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The S3 server, with its credentials in the environment as a deployment would set them."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return s3_server
