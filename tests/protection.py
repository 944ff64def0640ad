"""Helpers of the protection tests: a gateway in this process with chosen settings, a worker without JAX work."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from aiohttp.test_utils import TestClient

from common.redis_conn import connect
from gateway.app import create_app
from gateway.config import GatewayConfig
from testkit.standin import StandInPipeline
from tests.support import TEST_SHAPES, ClientFactory, RedisServer
from worker.config import WorkerConfig
from worker.runner import Worker

Client = TestClient[Any, Any]


async def gateway(aiohttp_client: ClientFactory, redis_server: RedisServer, **settings: Any) -> Client:
    """A gateway on db 0 (1 s request timeout) with `settings` over the defaults."""
    defaults: dict[str, Any] = {"redis_url": redis_server.url(0), "request_timeout_s": 1.0, "result_ttl_s": 60}
    config = GatewayConfig(**(defaults | settings))
    return await aiohttp_client(create_app(config))


async def error_of(response: Any) -> dict[str, Any]:
    """The `error` object of an error answer, checking the shape every refusal has."""
    body = await response.json()
    error: dict[str, Any] = body["error"]
    assert set(error) == {"code", "message", "field"} and error["message"], body
    return error


@contextlib.asynccontextmanager
async def running_worker(redis_url: str, worker_id: str = "fake-worker", **settings: Any) -> AsyncIterator[Worker]:
    """A real Worker (its loop, heartbeats and queue scripts) on `redis_url` with a stand-in pipeline (or the
    `pipeline` given), ready."""
    defaults: dict[str, Any] = {"heartbeat_interval_s": 0.5, "heartbeat_ttl_s": 2.0, "claim_block_ms": 100}
    shapes = settings.pop("shapes", TEST_SHAPES)
    pipeline = settings.pop("pipeline", None) or StandInPipeline(shapes)
    defaults |= {
        "sizes": tuple(dict.fromkeys(shape.size for shape in shapes)),
        "max_steps": max(shape.steps for shape in shapes),
        "default_steps": shapes[0].steps,
    }
    config = WorkerConfig(redis_url=redis_url, worker_id=worker_id, metrics_port=0, **{**defaults, **settings})
    redis = connect(redis_url, name=f"test-worker:{worker_id}")
    worker = Worker(config, redis, load_pipeline=lambda: pipeline)
    task = asyncio.create_task(worker.run())
    try:
        while worker.warming or worker.info.state != "ready":
            if task.done():
                task.result()
            await asyncio.sleep(0.02)
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 10)
        await redis.aclose()
