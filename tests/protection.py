"""Helpers of the protection tests: a gateway in this process with chosen settings, a worker without JAX work."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
from aiohttp.test_utils import TestClient

from common.protocol import Shape
from common.redis_conn import connect
from gateway.app import create_app
from gateway.config import GatewayConfig
from tests.conftest import TEST_SHAPES, ClientFactory, RedisServer
from worker.config import WorkerConfig
from worker.pipeline import CompileTimings, UnsupportedShape
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


class FakePipeline:
    """Stands in for SDXLPipeline in a real Worker: every shape compiles at once, a generation reports each
    step and returns grey images, so the worker's whole Redis path runs without JAX work."""

    device_kind = "fake"
    devices = 4

    def __init__(self, shapes: tuple[Shape, ...] = TEST_SHAPES, step_s: float = 0.0) -> None:
        self._shapes = shapes
        self._step_s = step_s

    def default_shapes(self) -> tuple[Shape, ...]:
        return self._shapes

    def compile(self, shape: Shape) -> CompileTimings:
        return CompileTimings(lower_s=0.0, compile_s=0.0, warmup_s=0.0)

    def generate(
        self,
        shape: Shape,
        prompt: str,
        negative_prompt: str,
        seed: int,
        guidance_scale: float,
        on_step: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        if shape not in self._shapes:
            raise UnsupportedShape(f"shape {shape} is not compiled here")
        for step in range(1, shape.steps + 1):
            time.sleep(self._step_s)
            if on_step is not None:
                on_step(step)
        return np.full((4, shape.height, shape.width, 3), 128, dtype=np.uint8)


@contextlib.asynccontextmanager
async def running_worker(redis_url: str, worker_id: str = "fake-worker", **settings: Any) -> AsyncIterator[Worker]:
    """A real Worker (its loop, heartbeats and queue scripts) on `redis_url` with a FakePipeline, ready."""
    config = WorkerConfig(
        redis_url=redis_url,
        shapes=TEST_SHAPES,
        worker_id=worker_id,
        heartbeat_interval_s=0.5,
        heartbeat_ttl_s=2.0,
        claim_block_ms=100,
        metrics_port=0,
        **settings,
    )
    redis = connect(redis_url, name=f"test-worker:{worker_id}")
    worker = Worker(config, redis, load_pipeline=FakePipeline)  # type: ignore[arg-type]  # duck-typed stand-in
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
