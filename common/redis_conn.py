"""Creating Redis clients from a URL, the same way in every process."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError


def connect(url: str, *, name: str) -> aioredis.Redis:
    """A client that returns bytes (images are binary) and retries dropped connections with backoff."""
    return aioredis.Redis.from_url(
        url,
        decode_responses=False,
        client_name=name,
        health_check_interval=15,
        socket_keepalive=True,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=5),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
