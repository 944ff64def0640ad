"""Creating Redis clients from a URL, the same way in every process.

Two kinds of URL: a plain one (`redis://`, `rediss://`, `unix://`) names one server; a Sentinel one names the
sentinels that watch a replicated Redis and the service (master) they watch:

    redis+sentinel://[user:password@]host1:port1,host2:port2/service_name[/db][?sentinel_password=...]

With a Sentinel URL, every connection asks the sentinels where the master is; when the master fails and the
sentinels promote a replica, connections to the old one fail, are retried with backoff, and land on the new
master. The credentials in the user part are the data servers'; `sentinel_password` is the sentinels' own.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote

import redis.asyncio as aioredis
from redis.asyncio import BlockingConnectionPool
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection
from redis.backoff import ConstantBackoff, ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

logger = logging.getLogger(__name__)

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

# The one maxmemory-policy under which Redis never drops a key of ours. Every other one does, when memory runs
# out: allkeys-* any key (queued jobs, records, streams), volatile-* the keys with a TTL (worker registry
# entries, results, finished jobs' records, idempotency keys).
SAFE_EVICTION_POLICY = "noeviction"
ALLOW_EVICTING_FLAG = "--allow-evicting-redis"

SENTINEL_SCHEME = "redis+sentinel://"
URL_SCHEMES = ("redis://", "rediss://", "unix://", SENTINEL_SCHEME)
DEFAULT_SENTINEL_PORT = 26379


class EvictingRedis(RedisConnectionError):
    """Redis may evict this cluster's keys and that was not accepted: every connection to it is refused, so the
    process treats it as an unreachable Redis (gateways answer 503, workers wait) until its policy is fixed."""


class RedisUrlError(ValueError):
    """A Redis URL that cannot be used; the message says which part is wrong."""


@dataclass(frozen=True)
class SentinelUrl:
    """The parts of a `redis+sentinel://` URL."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None


def check_url(url: str) -> None:
    """Raise RedisUrlError unless `url` is a Redis URL that `connect` accepts."""
    if not url.startswith(URL_SCHEMES):
        raise RedisUrlError(f"must be a {', '.join(URL_SCHEMES)} URL")
    if url.startswith(SENTINEL_SCHEME):
        parse_sentinel_url(url)


def parse_sentinel_url(url: str) -> SentinelUrl:
    """Split `redis+sentinel://[user:pass@]h1:p1,h2:p2/service[/db][?sentinel_password=...]`."""
    if not url.startswith(SENTINEL_SCHEME):
        raise RedisUrlError(f"a Sentinel URL starts with {SENTINEL_SCHEME}")
    rest, _, query = url[len(SENTINEL_SCHEME) :].partition("?")
    creds, _, rest = rest.rpartition("@")
    hosts, _, path = rest.partition("/")
    service, _, db = path.partition("/")
    if not service:
        raise RedisUrlError("a Sentinel URL names its service: redis+sentinel://host:port/service_name")
    if db and not db.isdigit():
        raise RedisUrlError(f"the database after the service must be a number, not {db!r}")
    username, _, password = creds.partition(":") if creds else ("", "", "")
    sentinel_password = parse_qs(query).get("sentinel_password", [None])[-1]
    return SentinelUrl(
        sentinels=tuple(_host_port(part) for part in hosts.split(",")),
        service=unquote(service),
        db=int(db or 0),
        username=unquote(username) or None,
        password=unquote(password) or None,
        sentinel_password=sentinel_password,
    )


def _host_port(part: str) -> tuple[str, int]:
    """`host[:port]` or `[v6addr][:port]`; the port defaults to Sentinel's 26379."""
    if part.startswith("["):
        host, _, port = part[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, _, port = part.partition(":")
    if not host:
        raise RedisUrlError(f"a sentinel address is empty in {part!r}: list them as host:port,host:port")
    if port and not port.isdigit():
        raise RedisUrlError(f"the port of sentinel {host} must be a number, not {port!r}")
    return host, int(port or DEFAULT_SENTINEL_PORT)


class BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """The master's connections, found through Sentinel, with the blocking pool's wait for a free one."""


class FollowingSentinelConnection(SentinelManagedConnection):
    """A connection to the master that asks the sentinels where it is each time it reconnects.

    redis-py reconnects a connection that dropped in the middle of a command through `connect_check_health`,
    which retries the address the connection had (the dead master's) until its retries run out; only a
    connection taken fresh from the pool asks the sentinels. Measured: in-flight commands then failed after
    the whole retry window (5 s) where a new one succeeded as soon as the replica was promoted.
    """

    async def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> None:
        if retry_socket_connect and not self.is_connected:
            # Ask the sentinels, then connect: to the new master after a failover.
            await self.connect()  # type: ignore[no-untyped-call]
            return
        await super().connect_check_health(check_health=check_health, retry_socket_connect=retry_socket_connect)


def _keepalive_options() -> dict[int, int]:
    """Kernel probes after 5 s of silence, every 2 s, 3 misses: a dead link errors within about 11 s.

    This also covers pub/sub, whose blocking read ignores the socket timeout.
    """
    wanted = {"TCP_KEEPIDLE": 5, "TCP_KEEPINTVL": 2, "TCP_KEEPCNT": 3}
    return {getattr(socket, name): value for name, value in wanted.items() if hasattr(socket, name)}


def eviction_check(allow: bool) -> Callable[[AbstractConnection], Awaitable[None]]:
    """What each new connection runs once connected (redis-py's `redis_connect_func`): the usual handshake, then
    a look at the server's maxmemory-policy, raising EvictingRedis unless it is `noeviction` or `allow`. Every
    connection is checked, so a reconnect to a restarted, reconfigured or promoted server is too."""
    reported: set[str] = set()  # policies already logged by this process: each is said once, not per connection

    async def on_connect(connection: AbstractConnection) -> None:
        await connection.on_connect()
        policy = await _eviction_policy(connection)
        if policy in (SAFE_EVICTION_POLICY, None):
            return
        problem = (
            f"Redis at {_address(connection)} may evict this cluster's keys (maxmemory-policy {policy}): "
            f"set maxmemory-policy {SAFE_EVICTION_POLICY}, or pass {ALLOW_EVICTING_FLAG} to run anyway"
        )
        if not allow:
            if policy not in reported:
                logger.error("%s", problem)
            reported.add(policy)
            raise EvictingRedis(problem)
        if policy not in reported:
            logger.warning("%s; accepted by %s: jobs, results and workers may vanish", problem, ALLOW_EVICTING_FLAG)
        reported.add(policy)

    return on_connect


def _address(connection: AbstractConnection) -> str:
    host, port = getattr(connection, "host", None), getattr(connection, "port", None)
    return f"{host}:{port}" if host else str(getattr(connection, "path", "?"))


async def _eviction_policy(connection: AbstractConnection) -> str | None:
    """The server's maxmemory-policy (INFO memory), or None where the user may not run INFO."""
    try:
        await connection.send_command("INFO", "memory")
        info = text(await connection.read_response())
    except ResponseError as exc:  # an ACL without +info: say so once per connection, do not refuse
        logger.warning("cannot read Redis's maxmemory-policy (%s); grant +info to have it checked", exc)
        return None
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    return fields.get("maxmemory_policy", "").strip() or None


def _connection_options(name: str, retries: int = 5, allow_evicting: bool = False) -> dict[str, Any]:
    return {
        "redis_connect_func": eviction_check(allow_evicting),
        "max_connections": MAX_CONNECTIONS,
        "timeout": POOL_WAIT_S,
        "decode_responses": False,
        "client_name": name,
        "health_check_interval": 5,
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "socket_keepalive": True,
        "socket_keepalive_options": _keepalive_options(),
        "retry": Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=retries),
        "retry_on_error": list(CONNECTION_ERRORS),
    }


def connect(url: str, *, name: str, allow_evicting: bool = False) -> aioredis.Redis:
    """A client that returns bytes (images are binary), retries dropped connections with backoff, and waits
    for a free connection when all `MAX_CONNECTIONS` are busy. A `redis+sentinel://` URL gives a client of
    the current master that follows a failover. Each connection refuses a server that may evict keys
    (EvictingRedis) unless `allow_evicting`."""
    options = _connection_options(name, allow_evicting=allow_evicting)
    if url.startswith(SENTINEL_SCHEME):
        return _connect_sentinel(parse_sentinel_url(url), options)
    return aioredis.Redis.from_pool(BlockingConnectionPool.from_url(url, **options))


def _connect_sentinel(target: SentinelUrl, options: dict[str, Any]) -> aioredis.Redis:
    sentinel = Sentinel(
        list(target.sentinels),
        sentinel_kwargs={
            "socket_timeout": CONNECT_TIMEOUT_S,
            "socket_connect_timeout": CONNECT_TIMEOUT_S,
            "password": target.sentinel_password,
        },
    )
    client: aioredis.Redis = sentinel.master_for(
        target.service,
        connection_pool_class=BlockingSentinelPool,
        connection_class=FollowingSentinelConnection,
        db=target.db,
        username=target.username,
        password=target.password,
        # A fresh connection says PING first, so one to a server that is no longer the master (or is gone)
        # fails at once and is retried against the sentinels' new answer.
        check_connection=True,
        # Retries at a steady 0.25 s, 5 s in all: long enough to ride out most of a failover (a master is
        # declared down after `down-after-milliseconds`, a replica promoted a second or two later), and each
        # try asks the sentinels again, so a command lands on the new master within 0.25 s of the switch
        # rather than up to 2 s later, as with an exponential backoff.
        **{**options, "retry": Retry(ConstantBackoff(0.25), retries=20)},
    )
    return client


def text(value: bytes | str) -> str:
    """A Redis reply (bytes, since clients do not decode) as text."""
    return value.decode() if isinstance(value, bytes) else value
