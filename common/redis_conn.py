"""Creating Redis clients from a URL, the same way in every process."""

from __future__ import annotations

import socket

import redis.asyncio as aioredis
from redis.asyncio import BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError
from redis.exceptions import TimeoutError as RedisTimeoutError

# A read waits at most this long: more than any blocking read we issue (XREADGROUP blocks 1 s), short
# enough that a silently cut link (no RST: the peer's host is gone) is noticed and retried.
SOCKET_TIMEOUT_S = 15.0
CONNECT_TIMEOUT_S = 5.0
# Connections per process: under a burst, requests wait (at most POOL_WAIT_S) for one of these instead of
# failing at redis-py's limit, and Redis sees a bounded number of clients per gateway.
MAX_CONNECTIONS = 100
POOL_WAIT_S = 10.0

# The link failed: redis-py retries these itself, with backoff.
CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError)
# "Redis cannot take this right now, try again later", as opposed to a mistake in the command: the link
# failed, or Redis is full (maxmemory reached under `noeviction`, which refuses writes until memory is
# freed, e.g. as results expire). Gateways answer 503 with Retry-After; workers wait and retry.
UNAVAILABLE = (*CONNECTION_ERRORS, OutOfMemoryError)


def _keepalive_options() -> dict[int, int]:
    """Kernel probes after 5 s of silence, every 2 s, 3 misses: a dead link errors within about 11 s.

    This also covers pub/sub, whose blocking read ignores the socket timeout.
    """
    wanted = {"TCP_KEEPIDLE": 5, "TCP_KEEPINTVL": 2, "TCP_KEEPCNT": 3}
    return {getattr(socket, name): value for name, value in wanted.items() if hasattr(socket, name)}


def connect(url: str, *, name: str) -> aioredis.Redis:
    """A client that returns bytes (images are binary), retries dropped connections with backoff, and waits
    for a free connection when all `MAX_CONNECTIONS` are busy."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=POOL_WAIT_S,
        decode_responses=False,
        client_name=name,
        health_check_interval=5,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_keepalive=True,
        socket_keepalive_options=_keepalive_options(),
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=5),
        retry_on_error=list(CONNECTION_ERRORS),
    )
    return aioredis.Redis.from_pool(pool)


def text(value: bytes | str) -> str:
    """A Redis reply (bytes, since clients do not decode) as text."""
    return value.decode() if isinstance(value, bytes) else value
