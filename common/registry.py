"""The worker registry: each worker describes itself under its own expiring key and heartbeats.

A worker that stops heartbeating disappears when its key expires; the index (a sorted set scored by
last heartbeat) is pruned of such ids whenever it is read. State changes are also announced on a
pub/sub channel so that `sdxl-serve up` and the tests can await readiness instead of polling.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Literal

import redis.asyncio as aioredis
from pydantic import BaseModel, model_validator

from common.protocol import DEFAULT_SCHEDULER, DEFAULT_STEPS, REQUEST_KINDS, RequestKind, Size
from common.rediskeys import RedisKeys

logger = logging.getLogger(__name__)

WorkerState = Literal["warming", "ready", "busy", "draining"]
SERVING_STATES: frozenset[str] = frozenset({"ready", "busy"})


class WorkerInfo(BaseModel):
    """What a worker says about itself."""

    id: str
    host: str
    pid: int
    model: str
    device_kind: str = "unknown"
    devices: int = 0
    # The most images one request may ask for (its `n`).
    images_per_request: int
    # Its batch: how many images (rows) it holds at once over all its devices, and how many of them are free now
    # (neither denoising nor claimed and waiting). Placement and the autoscaler read capacity from these. 0 in an
    # entry of a worker from before the engine: then it holds one request at a time.
    rows: int = 0
    free_rows: int = 0
    # What it serves: these sizes, at any step count from 1 to max_steps, with these schedulers. Its own
    # default is its first size at default_steps.
    sizes: list[Size] = []
    max_steps: int = 0
    default_steps: int = DEFAULT_STEPS
    schedulers: list[str] = [DEFAULT_SCHEDULER]
    # LoRA (worker/lora.py): the adapters it offers (a request may name any of them), those its device pool holds
    # now (placement prefers a worker that has a request's adapters), and the most one request may name (0: it
    # takes none).
    loras: list[str] = []
    loras_loaded: list[str] = []
    max_loras: int = 0
    # Whether it generates from an input image (image-to-image, inpainting: `Job.inputs`); only such a worker is
    # given a job that has one. False for a worker of a version without it.
    image_input: bool = False
    # The kinds of request it runs (common/protocol.py RequestKind): SDXL base all three with image_input, text to
    # image only without; an inpainting model (a 9-channel UNet) inpainting only. Placement reads this, not
    # image_input. An entry of a worker from before it existed reads as image_input meant (`_kinds_of_old_entry`).
    request_kinds: list[RequestKind] = []
    state: WorkerState
    # While warming, what it does now ("loading weights", "compiling 1216x832 (3/9)"); None otherwise. Optional,
    # so a gateway and a worker of versions with and without it read each other's entries.
    phase: str | None = None
    started_at: float
    ready_at: float | None = None
    jobs_done: int = 0
    last_heartbeat: float = 0.0
    metrics_port: int | None = None  # the worker's /metrics, /healthz and /readyz, on `host`
    random_weights: bool = False  # it runs the tiny random-weight model (worker/tiny_model.py): its images are noise

    @model_validator(mode="before")
    @classmethod
    def _kinds_of_old_entry(cls, data: Any) -> Any:
        """An entry without `request_kinds` (a worker of an earlier version, or one built without them): the kinds
        its `image_input` meant, all three or text to image only."""
        if isinstance(data, dict) and "request_kinds" not in data:
            return {**data, "request_kinds": kinds_of(bool(data.get("image_input", False)))}
        return data


def kinds_of(image_input: bool) -> list[RequestKind]:
    """The kinds an SDXL base model runs: all three where its worker takes input images, else text to image."""
    return list(REQUEST_KINDS) if image_input else ["text-to-image"]


class Registry:
    """Read and write one cluster's worker registry."""

    def __init__(self, redis: aioredis.Redis, keys: RedisKeys) -> None:
        self._redis = redis
        self._keys = keys

    async def publish(self, info: WorkerInfo, ttl_s: float) -> None:
        """Write (or refresh) a worker's entry and announce its state."""
        info = info.model_copy(update={"last_heartbeat": time.time()})
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._keys.worker(info.id), info.model_dump_json(), px=int(ttl_s * 1000))
            pipe.zadd(self._keys.workers_index, {info.id: info.last_heartbeat})
            pipe.publish(self._keys.worker_events_channel, info.model_dump_json())
            await pipe.execute()

    async def remove(self, worker_id: str) -> None:
        """Deregister a worker that is shutting down."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._keys.worker(worker_id))
            pipe.zrem(self._keys.workers_index, worker_id)
            await pipe.execute()

    async def workers(self) -> list[WorkerInfo]:
        """Every live worker, sorted by id; ids whose entry expired are pruned from the index."""
        members: list[bytes] = await self._redis.zrange(self._keys.workers_index, 0, -1)  # type: ignore[assignment]
        ids = [member.decode() for member in members]
        if not ids:
            return []
        raw = await self._redis.mget([self._keys.worker(i) for i in ids])
        gone = [i for i, r in zip(ids, raw, strict=True) if r is None]
        if gone:
            await self._redis.zrem(self._keys.workers_index, *gone)
        return sorted((WorkerInfo.model_validate_json(r) for r in raw if r is not None), key=lambda w: w.id)

    async def wait_for_ready(
        self, count: int, timeout_s: float, among: Callable[[WorkerInfo], bool] = lambda _: True
    ) -> list[WorkerInfo]:
        """Wait until at least `count` workers (of those `among` accepts) serve; returns them. Raises TimeoutError."""
        async with self._redis.pubsub() as pubsub:
            await pubsub.subscribe(self._keys.worker_events_channel)
            async with asyncio.timeout(timeout_s):
                while True:
                    ready = [w for w in await self.workers() if w.state in SERVING_STATES and among(w)]
                    if len(ready) >= count:
                        return ready
                    await pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout_s)
