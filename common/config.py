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

from common.rediskeys import DEFAULT_PREFIX

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
REDIS_URL_SCHEMES = ("redis://", "rediss://", "unix://")


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names it."""


def require(ok: bool, name: str, rule: str) -> None:
    """Raise ConfigError naming the flag `name` and the `rule` it breaks, unless `ok`."""
    if not ok:
        raise ConfigError(f"{name} {rule}")


def require_redis_url(url: str) -> None:
    """The Redis URL is one redis-py can open."""
    require(url.startswith(REDIS_URL_SCHEMES), "--redis-url", "must be a redis://, rediss:// or unix:// URL")


def default_cache_dir() -> Path:
    """Per-user cache for generated models and compiled executables."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sdxl-serve"


def add_redis_arguments(parser: argparse.ArgumentParser, default: str | None = DEFAULT_REDIS_URL) -> None:
    """`--redis-url` (env SDXL_SERVE_REDIS_URL) and `--key-prefix`, as every role takes them."""
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("SDXL_SERVE_REDIS_URL", default),
        help="redis://[[user]:password@]host:port/db, rediss:// for TLS (env SDXL_SERVE_REDIS_URL)",
    )
    parser.add_argument("--key-prefix", default=DEFAULT_PREFIX, help="namespace of this cluster's Redis keys")


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
