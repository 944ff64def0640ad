"""What every role's configuration shares: the error type, the check helper, Redis defaults and logging.

Each role states its own settings and their defaults once, in its frozen dataclass (`gateway/config.py`,
`worker/config.py`); its command line (`gateway/cli.py`, `worker/cli.py`) reads the defaults from there.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode

from common.blobstore import REDIS as BLOBS_IN_REDIS
from common.blobstore import BlobStoreError
from common.blobstore import check_url as check_blob_store_url
from common.redis_conn import ALLOW_EVICTING_FLAG, UNAVAILABLE, EvictingRedis, RedisUrlError, check_url
from common.rediskeys import DEFAULT_PREFIX

if TYPE_CHECKING:
    import redis.asyncio as aioredis
    from _typeshed import DataclassInstance

logger = logging.getLogger(__name__)

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names it."""


def require(ok: bool, name: str, rule: str) -> None:
    """Raise ConfigError naming the flag `name` and the `rule` it breaks, unless `ok`."""
    if not ok:
        raise ConfigError(f"{name} {rule}")


def require_redis_url(url: str) -> None:
    """The Redis URL is one `common.redis_conn.connect` can open (a server's, or Sentinel's)."""
    try:
        check_url(url)
    except RedisUrlError as exc:
        raise ConfigError(f"--redis-url {exc}") from None


def require_blob_store_url(url: str) -> None:
    """The image store is `redis`, `file:///path` or `s3://bucket/prefix`."""
    try:
        check_blob_store_url(url)
    except BlobStoreError as exc:
        raise ConfigError(f"--blob-store {exc}") from None


def add_blob_store_argument(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, default: str | None = BLOBS_IN_REDIS
) -> None:
    """`--blob-store` (env SDXL_SERVE_BLOB_STORE): where images live. Gateways and workers must agree."""
    parser.add_argument(
        "--blob-store",
        default=os.environ.get("SDXL_SERVE_BLOB_STORE", default),
        metavar="redis|file:///PATH|s3://BUCKET/PREFIX",
        help="where images are kept: in the result's Redis hash (redis), a directory shared by every "
        "gateway and worker (file:///path), or S3-compatible storage (s3://bucket/prefix?endpoint=URL, "
        "credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) (env SDXL_SERVE_BLOB_STORE)",
    )


def default_cache_dir() -> Path:
    """Per-user cache for generated models and compiled executables."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sdxl-serve"


def add_redis_arguments(parser: argparse.ArgumentParser, default: str | None = DEFAULT_REDIS_URL) -> None:
    """`--redis-url` (env SDXL_SERVE_REDIS_URL) and `--key-prefix`, as every role takes them."""
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("SDXL_SERVE_REDIS_URL", default),
        help="redis://[[user]:password@]host:port/db, rediss:// for TLS, or through Sentinel "
        "redis+sentinel://[[user]:password@]host:port,host:port/service[/db] (env SDXL_SERVE_REDIS_URL)",
    )
    parser.add_argument("--key-prefix", default=DEFAULT_PREFIX, help="namespace of this cluster's Redis keys")


def add_eviction_argument(parser: argparse.ArgumentParser) -> None:
    """`--allow-evicting-redis`: run on a Redis whose maxmemory-policy may evict keys (refused by default)."""
    parser.add_argument(
        ALLOW_EVICTING_FLAG,
        action="store_true",
        default=os.environ.get("SDXL_SERVE_ALLOW_EVICTING_REDIS", "") in ("1", "true", "yes"),
        help="run even where Redis's maxmemory-policy is not noeviction, which lets it drop queued jobs, "
        "records, results and worker registrations when full (env SDXL_SERVE_ALLOW_EVICTING_REDIS)",
    )


async def refuse_evicting_redis(redis: aioredis.Redis) -> None:
    """At start: ConfigError naming the fix when Redis may evict keys and that was not accepted. An unreachable
    Redis is no reason to stop: each connection checks the policy once it gets through."""
    try:
        await redis.ping()
    except EvictingRedis as exc:
        raise ConfigError(str(exc)) from None
    except UNAVAILABLE as exc:
        logger.warning("could not check Redis's maxmemory-policy yet (%s); each connection checks it", exc)


def log_config(logger: logging.Logger, config: DataclassInstance) -> None:
    """Log every resolved setting once at start, with credentials in the Redis URL masked."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name == "redis_url":
            value = mask_url(value)
        elif field.name.endswith("_token") and value is not None:  # a secret: only whether one is set
            value = "***"
        logger.info("config %s=%s", field.name, value)


def mask_url(url: str) -> str:
    """Hide the password of a Redis URL (in its user part or a `password=` query), keeping the rest readable."""
    scheme, sep, rest = url.partition("://")
    rest, question, query = rest.partition("?")
    if question:
        pairs = [(k, "***" if k == "password" else v) for k, v in parse_qsl(query, keep_blank_values=True)]
        query = urlencode(pairs, safe="*/")
    creds, at, host = rest.rpartition("@")
    if at:
        user = creds.split(":", 1)[0]
        rest = f"{user}:***@{host}" if user else f"***@{host}"
    return f"{scheme}{sep}{rest}{question}{query}"
