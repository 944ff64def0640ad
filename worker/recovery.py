"""Nothing is lost when a worker dies: its jobs are taken over, or moved back to the shared streams.

An entry stays pending under its consumer until acknowledged, and an idle worker takes over the pending
entries of every consumer whose registry entry has expired (death is decided by heartbeat, never by how long a
job has run, so a slow worker keeps its job). The takeover is one Lua script (XPENDING then XCLAIM), so two
workers can never both take the same entry. An entry delivered more than `max_deliveries` times in all (on
every stream it was on) goes to the dead-letter stream with its history, and its requester gets a failed
result.

Under `random` and `p2c` placement a job waits on its worker's own stream; what a departed worker leaves
there is moved to the shared stream of its size (`rehome`), carrying the deliveries it had, and the stream
is dropped only by a script that finds it empty, so a job submitted meanwhile is never dropped with it.
"""

from __future__ import annotations

import logging
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from common.redis_conn import text
from common.rediskeys import RedisKeys
from common.scripts import register
from common.streams import JobStreams
from worker.delivery import ClaimedJob, Delivery, MalformedJob, pairs, parse_entry

logger = logging.getLogger(__name__)

# A departed worker's stream is emptied and dropped in at most this many passes per call (each submit that
# races the drop starts another); what is left waits for the next reclaim round.
REHOME_ROUNDS = 10
# The lifetime of the failure stored for an entry that does not parse, found while rehoming.
MALFORMED_RESULT_TTL_S = 3600


class Recovery:
    """Take over the jobs of dead workers and rehome the streams of departed ones."""

    def __init__(self, redis: aioredis.Redis, keys: RedisKeys, delivery: Delivery) -> None:
        self._redis = redis
        self._keys = keys
        self._delivery = delivery  # settles (dead-letters) a job delivered too often
        self._streams = JobStreams(redis, keys)
        self._take_over = register(redis, "take_over")
        self._move = register(redis, "move")
        self._drop_if_empty = register(redis, "drop_if_empty")

    async def reclaim(
        self, consumer: str, live: set[str], max_deliveries: int, streams: list[str]
    ) -> ClaimedJob | None:
        """Take over one job of `streams` from a consumer that is no longer alive (not in `live`), if any.

        Jobs delivered more than `max_deliveries` times are dead-lettered on the way, not returned.
        Raises MalformedJob for an unparseable entry, as `claim` does.
        """
        for stream in streams:
            claimed = await self._reclaim_from(stream, consumer, live, max_deliveries)
            if claimed is not None:
                return claimed
        return None

    async def _reclaim_from(self, stream: str, consumer: str, live: set[str], max_deliveries: int) -> ClaimedJob | None:
        for dead in await self._dead_consumers(stream, live | {consumer}):
            while taken := await self._take_over(
                keys=[stream, self._keys.stats], args=[self._keys.workers_group, dead, consumer]
            ):
                entry_id, deliveries, fields = text(taken[0]), int(taken[1]), taken[2]
                if not fields:
                    continue
                claimed = parse_entry(stream, entry_id, pairs(fields), deliveries)
                logger.warning(
                    "took over job %s from dead worker %s (delivery %d)", claimed.job.id, dead, claimed.deliveries
                )
                if not await self._delivery.dead_letter_if_exhausted(claimed, consumer, max_deliveries):
                    return claimed
        return None

    async def _dead_consumers(self, stream: str, live: set[str]) -> list[str]:
        try:
            consumers = await self._redis.xinfo_consumers(stream, self._keys.workers_group)
        except ResponseError:  # no such stream or group yet: nobody to take over from
            return []
        return [name for c in consumers if (name := text(c["name"])) not in live]

    async def rehome_orphans(self, live: set[str]) -> int:
        """Move every job left on the stream of a worker that is gone to the shared stream of its size.

        Under `random` and `p2c` routing a job waits on its worker's own stream; when that worker dies or
        drains, what it had not finished (queued, or in service when it died) must go back to be served by
        the others. Returns how many jobs were moved.
        """
        moved = 0
        for stream in await self._streams.names():
            owner = self._keys.worker_of_stream(stream)
            if owner is not None and owner not in live:
                moved += await self.rehome(stream)
        return moved

    async def rehome(self, stream: str) -> int:
        """Move the jobs of one worker stream to their size streams, then drop the emptied stream."""
        await self._streams.ensure_group(stream)  # a submit racing the owner's exit may have recreated it bare
        moved = 0
        for _ in range(REHOME_ROUNDS):
            while entries := await self._entries(stream, 100):
                for entry_id, fields in entries:
                    moved += await self._rehome_entry(stream, text(entry_id), fields)
            # Emptiness is checked again by the deleting script: a job submitted since the last read stays.
            if await self._drop_if_empty(keys=[stream, self._keys.job_streams]):
                break
        if moved:
            logger.warning("moved %d job(s) of departed worker stream %s to the shared streams", moved, stream)
        return moved

    async def _entries(self, stream: str, count: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
        entries: Any = await self._redis.xrange(stream, count=count)
        return list(entries)

    async def _rehome_entry(self, stream: str, entry_id: str, fields: dict[bytes, bytes]) -> int:
        try:
            job = parse_entry(stream, entry_id, fields).job
        except MalformedJob as bad:
            logger.error("rejecting malformed job while rehoming: %s", bad)
            await self._delivery.reject(bad, "rehome", MALFORMED_RESULT_TTL_S)
            return 0
        target = self._keys.size_stream(job.params.shape.size)
        await self._streams.ensure_group(target)
        moved = await self._move(
            keys=[stream, target, self._keys.job(job.id)], args=[self._keys.workers_group, entry_id]
        )
        return int(moved)
