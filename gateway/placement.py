"""Where a job is queued: the placement policy of a gateway (`--routing`).

- `shared` (default): the shared stream of the job's shape, from which every idle worker serving the shape
  pulls one job at a time (join-idle-queue). A job never waits behind a busy worker while another is idle.
- `random`: the stream of one worker serving the shape, chosen uniformly at random: the reference demo's
  policy, kept for comparison.
- `p2c`: power of two choices: two workers serving the shape drawn at random, the job goes to the one with
  fewer jobs on its stream (queued plus in service).

Only ready or busy workers that compiled the job's shape are candidates, so heterogeneous workers (other
shapes, other device counts) are served correctly under every policy. A job routed to a worker that then
dies is moved to the shared stream of its shape (`Recovery.rehome_orphans`): nothing is lost.
"""

from __future__ import annotations

import random

import redis.asyncio as aioredis

from common.protocol import Shape
from common.rediskeys import RedisKeys
from common.registry import SERVING_STATES, WorkerInfo
from gateway.config import RoutingPolicy


class Placement:
    """Chooses the stream for each job according to one policy."""

    def __init__(
        self, policy: RoutingPolicy, redis: aioredis.Redis, keys: RedisKeys, rng: random.Random | None = None
    ) -> None:
        self.policy = policy
        self._redis = redis
        self._keys = keys
        self._rng = rng or random.Random()

    async def stream_for(self, shape: Shape, workers: list[WorkerInfo]) -> str:
        """The stream to queue a job of `shape` on; `workers` must include one serving it."""
        if self.policy == "shared":
            return self._keys.shape_stream(shape)
        candidates = sorted(w.id for w in workers if w.state in SERVING_STATES and shape in w.shapes)
        if not candidates:  # resolve_shape has refused this already; keep the job safe regardless
            return self._keys.shape_stream(shape)
        if self.policy == "random" or len(candidates) == 1:
            return self._keys.worker_stream(self._rng.choice(candidates))
        return await self._shorter_of_two(candidates)

    async def _shorter_of_two(self, candidates: list[str]) -> str:
        streams = [self._keys.worker_stream(w) for w in self._rng.sample(candidates, 2)]
        async with self._redis.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xlen(stream)
            lengths = await pipe.execute()
        if lengths[0] == lengths[1]:
            return self._rng.choice(streams)
        return streams[0] if lengths[0] < lengths[1] else streams[1]
