"""The queue from every side at once, for tests that play the gateway and the worker in one process."""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis

from common.jobstore import JobStore
from common.rediskeys import RedisKeys
from common.streams import JobStreams
from worker.delivery import Delivery
from worker.recovery import Recovery


@dataclass(frozen=True)
class Queue:
    """One cluster's job store, streams, and a worker's delivery and recovery, on one client."""

    jobs: JobStore
    streams: JobStreams
    delivery: Delivery
    recovery: Recovery

    @classmethod
    def of(cls, redis: aioredis.Redis, keys: RedisKeys) -> Queue:
        delivery = Delivery(redis, keys)
        return cls(JobStore(redis, keys), JobStreams(redis, keys), delivery, Recovery(redis, keys, delivery))
