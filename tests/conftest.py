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
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from gateway.app import create_app
from gateway.config import GatewayConfig
from testkit import (
    ProcessGroup,
    RedisOptions,
    RedisProcess,
    free_port,
    gateway_args,
    redis_process,
    wait_http,
    write_tiny_model,
)
from testkit.objectstore import S3Server, start_s3_server
from tests.support import (
    READY_TIMEOUT_S,
    ClientFactory,
    Cluster,
    RedisServer,
    register_worker,
    tiny_worker_args,
    wait_ready,
)

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


@pytest.fixture(scope="session")
def processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessGroup]:
    """The session's processes, each logging to its own file; all stopped at the end."""
    group = ProcessGroup(tmp_path_factory.mktemp("logs"))
    yield group
    group.stop_all()


@pytest.fixture(scope="session")
def cluster(redis_server: RedisServer, tiny_model: Path, processes: ProcessGroup) -> Cluster:
    """Gateway and workers as real processes, started once for the e2e tests."""
    redis_url = redis_server.url(1)
    redis.Redis.from_url(redis_url).flushdb()
    port = free_port()
    processes.start("gateway", *gateway_args(redis_url, port, "--request-timeout", "120"))
    worker_ids = ("worker-a", "worker-b")
    for worker_id in worker_ids:
        processes.start(worker_id, *tiny_worker_args(redis_url, tiny_model, worker_id))
    try:
        asyncio.run(wait_ready(redis_url, len(worker_ids)))
    except TimeoutError:
        pytest.fail("workers not ready:\n" + "\n".join(processes.log(w)[-3000:] for w in worker_ids))
    asyncio.run(wait_http(f"http://127.0.0.1:{port}/healthz", READY_TIMEOUT_S))
    return Cluster(url=f"http://127.0.0.1:{port}", redis_url=redis_url, worker_ids=worker_ids)


@pytest.fixture
def artifacts() -> Path:
    """A folder kept after the run (screenshots, logs) for people and CI to look at."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


# --- A gateway in this process (aiohttp test client), with a test playing the worker (tests/support.py).


@pytest.fixture
async def client(
    redis_server: RedisServer, redis_client: aioredis.Redis, aiohttp_client: ClientFactory
) -> TestClient[Any, Any]:
    """A gateway on db 0 with a 1 s request timeout."""
    config = GatewayConfig(redis_url=redis_server.url(0), request_timeout_s=1.0, result_ttl_s=60)
    return await aiohttp_client(create_app(config))


@pytest.fixture
async def fake_worker(redis_client: aioredis.Redis) -> AsyncIterator[None]:
    """A worker registered as serving TEST_SHAPES, with its streams; the test claims its jobs."""
    await register_worker(redis_client)
    yield


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
