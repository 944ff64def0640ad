"""Where a job is queued: the placement policy of a gateway (`--routing`).

- `shared` (default): the shared stream of the job's size, from which every idle worker serving the size
  pulls one job at a time (join-idle-queue). A job never waits behind a busy worker while another is idle.
- `random`: the stream of one worker that can run the job, chosen uniformly at random: the reference demo's
  policy, kept for comparison.
- `p2c`: power of two choices: two workers that can run the job drawn at random, the job goes to the one
  with fewer jobs on its stream (queued plus in service).

The candidates are the ready or busy workers that serve the job's size, its step count (up to their
`max_steps`) and its scheduler, so heterogeneous workers (other sizes, step ranges, schedulers, device
counts) are served correctly under every policy. Under `shared`, a job that some worker of its size could
not run (a smaller step range, fewer schedulers) goes to the stream of a candidate instead, the shorter of
two. A job routed to a worker that then dies is moved to the shared stream of its size
(`Recovery.rehome_orphans`): nothing is lost.
"""

from __future__ import annotations

import random

import redis.asyncio as aioredis

from common.protocol import Shape
from common.rediskeys import RedisKeys
from common.registry import SERVING_STATES, WorkerInfo
from gateway.config import RoutingPolicy
from gateway.shapes import runs


class Placement:
    """Chooses the stream for each job according to one policy."""

    def __init__(
        self, policy: RoutingPolicy, redis: aioredis.Redis, keys: RedisKeys, rng: random.Random | None = None
    ) -> None:
        self.policy = policy
        self._redis = redis
        self._keys = keys
        self._rng = rng or random.Random()

    async def stream_for(self, shape: Shape, scheduler: str, workers: list[WorkerInfo]) -> str:
        """The stream to queue a job of `shape` and `scheduler` on; `workers` must include one that runs it."""
        candidates = sorted(w.id for w in workers if w.state in SERVING_STATES and runs(w, shape, scheduler))
        size_stream = self._keys.size_stream(shape.size)
        if not candidates:  # resolve has refused this already; keep the job safe regardless
            return size_stream
        if self.policy == "shared":
            if all(runs(w, shape, scheduler) for w in workers if shape.size in w.sizes):
                return size_stream
            return await self._shorter_of_two(candidates) if len(candidates) > 1 else self._own(candidates[0])
        if self.policy == "random" or len(candidates) == 1:
            return self._own(self._rng.choice(candidates))
        return await self._shorter_of_two(candidates)

    def _own(self, worker_id: str) -> str:
        return self._keys.worker_stream(worker_id)

    async def _shorter_of_two(self, candidates: list[str]) -> str:
        streams = [self._keys.worker_stream(w) for w in self._rng.sample(candidates, 2)]
        async with self._redis.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xlen(stream)
            lengths = await pipe.execute()
        if lengths[0] == lengths[1]:
            return self._rng.choice(streams)
        return streams[0] if lengths[0] < lengths[1] else streams[1]
