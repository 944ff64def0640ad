"""Configuration: frozen dataclasses built once at an entry point, checked, logged and passed down."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from common.keys import DEFAULT_PREFIX
from common.protocol import Shape

DEFAULT_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
# The hub repository keeps its Flax weights on this ref, not on main.
DEFAULT_MODEL_REVISION = "refs/pr/95"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


RoutingPolicy = Literal["shared", "random", "p2c"]
# How the UNet's attention layers compute (worker/attention.py).
Attention = Literal["einsum", "dot_product"]
ATTENTION: tuple[str, ...] = get_args(Attention)


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names it."""


def default_cache_dir() -> Path:
    """Per-user cache for generated models and (later) compiled executables."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sdxl-serve"


@dataclass(frozen=True)
class GatewayConfig:
    """Settings of one gateway process."""

    redis_url: str = DEFAULT_REDIS_URL
    host: str = "0.0.0.0"
    port: int = 8000
    key_prefix: str = DEFAULT_PREFIX
    request_timeout_s: float = 120.0
    result_ttl_s: int = 3600
    routing: RoutingPolicy = "shared"  # see gateway/routing.py

    def __post_init__(self) -> None:
        _require(self.routing in ("shared", "random", "p2c"), "--routing", "must be shared, random or p2c")
        _require(1 <= self.port <= 65535, "--port", "must be 1..65535")
        _require(self.request_timeout_s > 0, "--request-timeout", "must be > 0")
        _require(self.result_ttl_s > 0, "--result-ttl", "must be > 0")
        _require(self.redis_url.startswith(("redis://", "rediss://", "unix://")), "--redis-url",
                 "must be a redis://, rediss:// or unix:// URL")


@dataclass(frozen=True)
class WorkerConfig:
    """Settings of one worker process. `shapes=None` means: the model's native size at the default steps."""

    redis_url: str = DEFAULT_REDIS_URL
    model: str = DEFAULT_MODEL
    revision: str | None = None
    shapes: tuple[Shape, ...] | None = None
    images_per_request: int = 4
    key_prefix: str = DEFAULT_PREFIX
    worker_id: str = dataclasses.field(default_factory=lambda: default_worker_id())
    heartbeat_interval_s: float = 2.0
    heartbeat_ttl_s: float = 10.0
    png_compress_level: int = 1
    claim_block_ms: int = 1000
    max_deliveries: int = 3
    drain_timeout_s: float = 120.0
    reclaim_interval_s: float = 1.0
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 0  # 0: any free port, published in the registry
    attention: Attention = "einsum"

    def __post_init__(self) -> None:
        _require(self.images_per_request >= 1, "--images-per-request", "must be >= 1")
        _require(0 <= self.png_compress_level <= 9, "--png-compress-level", "must be 0..9")
        _require(self.heartbeat_interval_s > 0, "--heartbeat-interval", "must be > 0")
        _require(self.heartbeat_ttl_s > 2 * self.heartbeat_interval_s, "--heartbeat-ttl",
                 "must exceed twice the heartbeat interval")
        _require(self.shapes is None or len(self.shapes) > 0, "--shapes", "must name at least one shape")
        _require(self.max_deliveries >= 1, "--max-deliveries", "must be >= 1")
        _require(self.drain_timeout_s > 0, "--drain-timeout", "must be > 0")
        _require(0 <= self.metrics_port <= 65535, "--metrics-port", "must be 0..65535")
        _require(self.attention in ATTENTION, "--attention", f"must be one of {', '.join(ATTENTION)}")
        _require(self.redis_url.startswith(("redis://", "rediss://", "unix://")), "--redis-url",
                 "must be a redis://, rediss:// or unix:// URL")

    @property
    def model_revision(self) -> str | None:
        """The revision to load: the one given, else the default model's Flax ref."""
        if self.revision is not None:
            return self.revision
        return DEFAULT_MODEL_REVISION if self.model == DEFAULT_MODEL else None


def default_worker_id() -> str:
    """host-pid-random: unique per process, readable in `/v1/workers` and logs."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def log_config(logger: logging.Logger, config: GatewayConfig | WorkerConfig) -> None:
    """Log every resolved setting once at start, with credentials in the Redis URL masked."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name == "redis_url":
            value = mask_url(value)
        logger.info("config %s=%s", field.name, value)


def mask_url(url: str) -> str:
    """Hide the password of a Redis URL, keeping the rest readable."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at:
        return url
    user = creds.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}" if user else f"{scheme}{sep}***@{host}"


def _require(ok: bool, name: str, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{name} {rule}")
