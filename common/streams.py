"""The job streams: each one read by every worker through one consumer group; created, listed and measured.

A job waits on the shared stream of its image size, or (under `random` and `p2c` placement) on the stream of one
worker. Every stream in use is listed in one set, so depth, recovery and operators find them all. The
counters of what happened to jobs (duplicates dropped, reclaims, dead letters, cancellations) live beside
them, for `/metrics` and `sdxl-serve status`.
"""

from __future__ import annotations

import bisect
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from common.redis_conn import text
from common.rediskeys import RedisKeys


class JobStreams:
    """Create, list and measure one cluster's job streams."""

    def __init__(self, redis: aioredis.Redis, keys: RedisKeys) -> None:
        self._redis = redis
        self._keys = keys

    async def ensure_group(self, stream: str) -> None:
        """Create a job stream and its consumer group if they do not exist yet, and list it (idempotent)."""
        try:
            await self._redis.xgroup_create(stream, self._keys.workers_group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        await self._redis.sadd(self._keys.job_streams, stream)

    async def names(self) -> list[str]:
        """Every job stream in use."""
        members: set[bytes] = await self._redis.smembers(self._keys.job_streams)  # type: ignore[assignment]
        return sorted(text(s) for s in members)

    async def depth(self) -> int:
        """Jobs queued or in service over all streams (entries are deleted when their result is stored)."""
        streams = await self.names()
        if not streams:
            return 0
        async with self._redis.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xlen(stream)
            return sum(await pipe.execute())

    async def counters(self) -> dict[str, int]:
        """Cluster-wide counters: duplicate_results, reclaimed, dead_lettered."""
        raw: dict[bytes, bytes] = await self._redis.hgetall(self._keys.stats)  # type: ignore[assignment]
        return {text(k): int(v) for k, v in raw.items()}

    async def positions(self, stream: str, entry_ids: list[str], limit: int = 1000) -> dict[str, int]:
        """How many undelivered jobs are ahead of each queued entry of `stream` (0: it is next).

        One XRANGE over the undelivered part of the stream, at most `limit` entries: positions beyond
        that are reported as `limit`.
        """
        if not entry_ids:
            return {}
        last = await self._last_delivered(stream)
        newest = max(entry_ids, key=_entry_key)
        ahead: list[tuple[int, int]] = []
        if _entry_key(newest) > _entry_key(last):
            entries: Any = await self._redis.xrange(stream, min=f"({last}", max=newest, count=limit)
            ahead = [_entry_key(text(e[0])) for e in entries]
        return {entry: min(bisect.bisect_left(ahead, _entry_key(entry)), limit) for entry in entry_ids}

    async def _last_delivered(self, stream: str) -> str:
        try:
            groups = await self._redis.xinfo_groups(stream)
        except ResponseError:  # the stream is gone (a departed worker's, already emptied)
            return "0-0"
        for group in groups:
            if text(group["name"]) == self._keys.workers_group:
                return text(group["last-delivered-id"])
        return "0-0"


def _entry_key(entry_id: str) -> tuple[int, int]:
    """A stream entry id as a sortable (milliseconds, sequence) pair."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
