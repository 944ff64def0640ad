"""Where a job is queued: the placement policy of a gateway (`--routing`).

- `shared` (default): the shared stream of the job's size, from which every idle worker serving the size
  pulls one job at a time (join-idle-queue). A job never waits behind a busy worker while another is idle.
- `random`: the stream of one worker that can run the job, chosen uniformly at random: the reference demo's
  policy, kept for comparison.
- `p2c`: power of two choices: two workers that can run the job drawn at random, the job goes to the one
  with more free rows (the images its batch has room for now, as its registry entry advertises), among
  those with room for the job's `n` images; when neither has room, to the shared stream of its size, which
  the first worker with room takes it from. A worker whose entry advertises no rows (one that runs one
  request at a time) is compared as before: the one with fewer jobs on its stream (queued plus in service).

The candidates are the ready or busy workers that serve the job's size, its step count (up to their
`max_steps`), its scheduler, its LoRA adapters (each offered, no more than their `max_loras`) and its kind
(`request_kinds`: text to image, image to image, inpainting), so heterogeneous workers (other sizes, step ranges,
schedulers, adapter folders, device counts, models, versions) are served correctly under every policy. Under
`shared`, a job that some worker of its size could not run (a smaller step range, fewer schedulers, an adapter it
does not offer, a kind it does not run: an inpainting model's, for a text or image-to-image job) goes to the stream
of a candidate instead, the shorter of two. A job with adapters goes, under `shared` and `p2c`, to a candidate whose
device pool holds them all already (`loras_loaded`) and has room for its images, when there is one (the one with the
most free rows): it starts without loading an adapter. A job routed to a worker that then dies is moved to the
shared stream of its size (`Recovery.rehome_orphans`): nothing is lost (a job may then reach a worker that does not
run its kind, which fails it, saying so: worker/inputs.py, worker/inpainting_model.py).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import redis.asyncio as aioredis

from common.protocol import RequestKind, Shape
from common.rediskeys import RedisKeys
from common.registry import SERVING_STATES, WorkerInfo
from gateway.config import RoutingPolicy
from gateway.loras import holds
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

    async def stream_for(
        self,
        shape: Shape,
        scheduler: str,
        workers: list[WorkerInfo],
        n: int = 1,
        loras: Sequence[str] = (),
        kind: RequestKind = "text-to-image",
    ) -> str:
        """The stream to queue a job of `shape`, `scheduler`, `n` images, the adapters named `loras` and the request
        `kind` (text to image, image to image, inpainting) on; `workers` must include one that runs it."""
        candidates = sorted(
            (w for w in workers if w.state in SERVING_STATES and runs(w, shape, scheduler, loras, kind)),
            key=lambda w: w.id,
        )
        size_stream = self._keys.size_stream(shape.size)
        shared_fits = all(runs(w, shape, scheduler, loras, kind) for w in workers if shape.size in w.sizes)
        if not candidates:  # resolve has refused this already; keep the job safe regardless
            return size_stream
        if loras and self.policy != "random" and (warm := self._holding(candidates, loras, n)) is not None:
            return self._own(warm.id)
        if self.policy == "shared":
            if shared_fits:
                return size_stream
            return await self._shorter_of_two(candidates) if len(candidates) > 1 else self._own(candidates[0].id)
        if self.policy == "random" or len(candidates) == 1:
            return self._own(self._rng.choice(candidates).id)
        drawn = self._rng.sample(candidates, 2)
        if not all(w.rows > 0 for w in drawn):
            return await self._shorter_of_two(drawn)
        return await self._more_free_rows(drawn, n, size_stream if shared_fits else None)

    def _holding(self, candidates: list[WorkerInfo], loras: Sequence[str], n: int) -> WorkerInfo | None:
        """Of the candidates whose pool holds every one of `loras` and that have room for `n` images, the one with
        the most free rows (ties: drawn at random); None when there is none."""
        warm = [w for w in candidates if w.free_rows >= n and holds(w, loras)]
        if not warm:
            return None
        most = max(w.free_rows for w in warm)
        return self._rng.choice([w for w in warm if w.free_rows == most])

    def _own(self, worker_id: str) -> str:
        return self._keys.worker_stream(worker_id)

    async def _more_free_rows(self, drawn: list[WorkerInfo], n: int, shared: str | None) -> str:
        """The stream of the one of two workers with room for `n` images that has more free rows (ties: the
        shorter stream); with room in neither, the shared stream (when every worker of the size may take the
        job from it), so that the job waits for the first worker with room, not for one chosen now."""
        fits = [w for w in drawn if w.free_rows >= n]
        if not fits:
            return shared if shared is not None else await self._shorter_of_two(drawn)
        most = max(w.free_rows for w in fits)
        best = [w for w in fits if w.free_rows == most]
        return self._own(best[0].id) if len(best) == 1 else await self._shorter_of_two(best)

    async def _shorter_of_two(self, candidates: list[WorkerInfo]) -> str:
        chosen = candidates if len(candidates) == 2 else self._rng.sample(candidates, 2)
        streams = [self._keys.worker_stream(w.id) for w in chosen]
        async with self._redis.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xlen(stream)
            lengths = await pipe.execute()
        if lengths[0] == lengths[1]:
            return self._rng.choice(streams)
        return streams[0] if lengths[0] < lengths[1] else streams[1]
