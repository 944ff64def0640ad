"""Configuration: frozen dataclasses built once at an entry point, checked, logged and passed down."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args
from urllib.parse import parse_qsl, urlencode

from common.apikeys import KeyRing
from common.keys import DEFAULT_PREFIX
from common.protocol import (
    DEFAULT_LIMITS,
    MAX_GUIDANCE,
    MAX_PROMPT_CHARS,
    MAX_RESULT_TTL_S,
    MIN_GUIDANCE,
    RequestLimits,
    Shape,
)
from common.ratelimit import Rate

DEFAULT_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
# The hub repository keeps its Flax weights on this ref, not on main.
DEFAULT_MODEL_REVISION = "refs/pr/95"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


RoutingPolicy = Literal["shared", "random", "p2c"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
DEFAULT_MAX_BODY_BYTES = 64 * 1024
DEFAULT_MAX_QUEUE_DEPTH = 100
# How the UNet's attention layers compute (worker/attention.py).
Attention = Literal["einsum", "dot_product"]
ATTENTION: tuple[str, ...] = get_args(Attention)


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names it."""


def default_cache_dir() -> Path:
    """Per-user cache for generated models and compiled executables."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sdxl-serve"


# Defaults of RateLimits: generous per address while no keys are configured (a development cluster, the
# test suite and the benchmarks run from one address), stricter for the public demo, per key in between.
_KEY_SUBMIT, _KEY_READ = Rate(5, 1.0, 50), Rate(50, 1.0, 500)
_ADDRESS_SUBMIT, _ADDRESS_READ = Rate(5, 1.0, 100), Rate(100, 1.0, 1000)
_PUBLIC_SUBMIT, _PUBLIC_READ = Rate(10, 60.0, 10), Rate(10, 1.0, 200)
_NO_KEYS = KeyRing()


@dataclass(frozen=True)
class RateLimits:
    """Per-client rate limits, by class of caller and kind of route; None: no limit.

    `key`: a caller with an API key, counted per key. `address`: a caller without one while no keys are
    configured, counted per client address. `public`: a caller without a key on the demo's routes while
    keys are configured (`--public-demo`), per address and stricter. `submit` routes create jobs; `read`
    routes look at them (status, events, images, cancel, workers).
    """

    key_submit: Rate | None = _KEY_SUBMIT
    key_read: Rate | None = _KEY_READ
    address_submit: Rate | None = _ADDRESS_SUBMIT
    address_read: Rate | None = _ADDRESS_READ
    public_submit: Rate | None = _PUBLIC_SUBMIT
    public_read: Rate | None = _PUBLIC_READ

    def get(self, caller_class: str, route_kind: str) -> Rate | None:
        rate: Rate | None = getattr(self, f"{caller_class}_{route_kind}")
        return rate

    def __str__(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name) or 'off'}" for f in dataclasses.fields(self))


_DEFAULT_RATE_LIMITS = RateLimits()


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
    limits: RequestLimits = DEFAULT_LIMITS  # prompt length and guidance range, within the protocol's
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # API keys: digests from the environment (hashed at start) and/or a keys file re-read when it changes.
    # With either, every /v1 route needs a key; `public_demo` leaves the demo page's routes open without one.
    api_keys: KeyRing = _NO_KEYS
    api_keys_file: Path | None = None
    public_demo: bool = False
    trusted_proxies: tuple[IPNetwork, ...] = ()  # X-Forwarded-For is believed only from these
    rate_limits: RateLimits = _DEFAULT_RATE_LIMITS
    max_queue_depth: int = DEFAULT_MAX_QUEUE_DEPTH  # per stream, queued or in service; 0: unbounded

    def __post_init__(self) -> None:
        _require(self.routing in ("shared", "random", "p2c"), "--routing", "must be shared, random or p2c")
        _require(1 <= self.port <= 65535, "--port", "must be 1..65535")
        _require(self.request_timeout_s > 0, "--request-timeout", "must be > 0")
        _require(0 < self.result_ttl_s <= MAX_RESULT_TTL_S, "--result-ttl", f"must be 1..{MAX_RESULT_TTL_S}")
        _require(
            self.redis_url.startswith(("redis://", "rediss://", "unix://")),
            "--redis-url",
            "must be a redis://, rediss:// or unix:// URL",
        )
        limits = self.limits
        _require(
            1 <= limits.max_prompt_chars <= MAX_PROMPT_CHARS,
            "--max-prompt-chars",
            f"must be 1..{MAX_PROMPT_CHARS} (the protocol's bound, which workers re-validate against)",
        )
        _require(
            MIN_GUIDANCE <= limits.min_guidance <= limits.max_guidance <= MAX_GUIDANCE,
            "--guidance-range",
            f"must be MIN..MAX within {MIN_GUIDANCE:g}..{MAX_GUIDANCE:g}",
        )
        _require(1024 <= self.max_body_bytes <= 16 * 1024 * 1024, "--max-body-bytes", "must be 1 KiB..16 MiB")
        _require(self.max_queue_depth >= 0, "--max-queue-depth", "must be >= 0 (0: unbounded)")

    @property
    def auth_enabled(self) -> bool:
        """Keys are configured: /v1 routes need one (the demo's, with `public_demo`, excepted)."""
        return len(self.api_keys) > 0 or self.api_keys_file is not None


@dataclass(frozen=True)
class WorkerConfig:
    """Settings of one worker process. `shapes=None` means: the model's native size at the default steps."""

    redis_url: str = DEFAULT_REDIS_URL
    model: str = DEFAULT_MODEL
    revision: str | None = None
    # Configs and tokenizers of a single-file checkpoint (None: SDXL base's, from the hub).
    model_config: str | None = None
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
    # None: compile at every start. See worker/compile_cache.py.
    compile_cache_dir: Path | None = dataclasses.field(default_factory=lambda: default_cache_dir() / "jax")
    compile_cache_max_bytes: int = 20 * 10**9
    attention: Attention = "einsum"

    def __post_init__(self) -> None:
        _require(self.images_per_request >= 1, "--images-per-request", "must be >= 1")
        _require(0 <= self.png_compress_level <= 9, "--png-compress-level", "must be 0..9")
        _require(self.heartbeat_interval_s > 0, "--heartbeat-interval", "must be > 0")
        _require(
            self.heartbeat_ttl_s > 2 * self.heartbeat_interval_s,
            "--heartbeat-ttl",
            "must exceed twice the heartbeat interval",
        )
        _require(self.shapes is None or len(self.shapes) > 0, "--shapes", "must name at least one shape")
        _require(self.max_deliveries >= 1, "--max-deliveries", "must be >= 1")
        _require(self.drain_timeout_s > 0, "--drain-timeout", "must be > 0")
        _require(0 <= self.metrics_port <= 65535, "--metrics-port", "must be 0..65535")
        _require(self.compile_cache_max_bytes > 0, "--compile-cache-max-gb", "must be > 0")
        _require(self.attention in ATTENTION, "--attention", f"must be one of {', '.join(ATTENTION)}")
        _require(
            self.redis_url.startswith(("redis://", "rediss://", "unix://")),
            "--redis-url",
            "must be a redis://, rediss:// or unix:// URL",
        )

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


def parse_networks(text: str) -> tuple[IPNetwork, ...]:
    """Comma-separated addresses or CIDR networks (`10.0.0.0/8,192.0.2.7`). Raises ValueError."""
    return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip())


def _require(ok: bool, name: str, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{name} {rule}")
