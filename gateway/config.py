"""The gateway's settings: one frozen dataclass, every default stated here once and read by gateway/cli.py."""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from common.apikeys import KeyRing, is_webhook_secret
from common.blobstore import REDIS as BLOBS_IN_REDIS
from common.config import DEFAULT_REDIS_URL, require, require_blob_store_url, require_redis_url
from common.input_images import InputLimits
from common.jobstore import DURABLE_ACCEPT, DurableAccept
from common.protocol import (
    DEFAULT_LIMITS,
    DEFAULT_RESULT_TTL_S,
    MAX_GUIDANCE,
    MAX_PROMPT_CHARS,
    MAX_RESULT_TTL_S,
    MIN_GUIDANCE,
    RequestLimits,
)
from common.rediskeys import DEFAULT_PREFIX
from gateway.ratelimit import Rate

RoutingPolicy = Literal["shared", "random", "p2c"]
ImageUrls = Literal["proxy", "presigned"]
ModerationFail = Literal["open", "closed"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Defaults of RateLimits: generous per address while no keys are configured (a development cluster, the
# test suite and the benchmarks run from one address), stricter for the public demo, per key in between.
_KEY_SUBMIT, _KEY_READ = Rate(5, 1.0, 50), Rate(50, 1.0, 500)
# Every submit burst is below the default --max-queue-depth: no single caller fills the queue at once.
_ADDRESS_SUBMIT, _ADDRESS_READ = Rate(5, 1.0, 50), Rate(100, 1.0, 1000)
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
class WebhookConfig:
    """How job webhooks are checked and sent (gateway/webhooks.py, docs/operations.md: Webhooks)."""

    allow_http: bool = False  # plain http targets (otherwise https only)
    # Hosts (names or addresses, as written in the URL) exempt from the address rules: loopback, private, ...
    allow_hosts: frozenset[str] = frozenset()
    secret: str | None = dataclasses.field(default=None, repr=False)  # the cluster's, for keys without their own
    timeout_s: float = 10.0  # one attempt, connect to last byte
    retry_window_s: float = 86400.0  # a message is retried this long after it became due, then given up
    backoff_s: float = 5.0  # the first retry's delay; it doubles with each attempt, up to max_backoff_s
    max_backoff_s: float = 3600.0
    jitter: float = 1.0  # each delay is drawn from [(1 - jitter) d, d]: 1 is full jitter
    max_retry_after_s: float = 3600.0  # a receiver's Retry-After is honoured up to this
    concurrency: int = 32  # attempts in flight per gateway
    max_outbox: int = 10_000  # jobs with messages due beyond which new webhook jobs get 429 (0: no bound)
    poll_s: float = 0.25  # the longest a gateway waits before looking at the due set again
    public_url: str | None = None  # prefixed to the image URLs of a webhook's body (`https://api.example.com`)

    def __post_init__(self) -> None:
        require(self.timeout_s > 0, "--webhook-timeout", "must be > 0")
        require(self.retry_window_s > 0, "--webhook-retry-window", "must be > 0")
        require(0 < self.backoff_s <= self.max_backoff_s, "--webhook-backoff", "must be > 0 and <= the maximum")
        require(0 <= self.jitter <= 1, "--webhook-jitter", "must be 0..1")
        require(self.max_retry_after_s > 0, "--webhook-max-retry-after", "must be > 0")
        require(self.concurrency >= 1, "--webhook-concurrency", "must be >= 1")
        require(self.max_outbox >= 0, "--webhook-max-outbox", "must be >= 0 (0: unbounded)")
        require(self.poll_s > 0, "--webhook-poll", "must be > 0")
        require(
            self.secret is None or is_webhook_secret(self.secret),
            "--webhook-secret",
            "must be whsec_ and 24..64 bytes in base64 (`sdxl-serve keys webhook-secret` makes one)",
        )
        public = self.public_url or "https://x"
        require(public.startswith(("http://", "https://")), "--public-url", "must be an http(s) URL")

    @property
    def lease_ms(self) -> int:
        """How long a gateway holds a message it is sending: twice one attempt's timeout and a second (a gateway
        that dies holding it delays the message this long)."""
        return int((2 * self.timeout_s + 1.0) * 1000)


@dataclass(frozen=True)
class PolicyConfig:
    """The prompt policy (gateway/policy.py, docs/safety.md): a blocklist file and an external moderation hook."""

    blocklist: Path | None = None  # words and `re:` expressions, one a line; re-read on change and on SIGHUP
    moderation_url: str | None = None  # POSTed {"prompt", "negative_prompt"} as JSON before a job is queued
    moderation_timeout_s: float = 2.0
    moderation_fail: ModerationFail = "closed"  # when the hook times out or errs: refuse (503) or let through

    def __post_init__(self) -> None:
        url = self.moderation_url or "https://x"
        require(url.startswith(("http://", "https://")), "--moderation-url", "must be an http(s) URL")
        require(self.moderation_timeout_s > 0, "--moderation-timeout", "must be > 0")
        require(self.moderation_fail in ("open", "closed"), "--moderation-fail", "must be open or closed")


DEFAULT_INPUT_LIMITS = InputLimits()


@dataclass(frozen=True)
class GatewayConfig:
    """Settings of one gateway process."""

    redis_url: str = DEFAULT_REDIS_URL
    host: str = "0.0.0.0"
    port: int = 8000
    key_prefix: str = DEFAULT_PREFIX
    allow_evicting_redis: bool = False  # run on a Redis whose maxmemory-policy may evict keys
    request_timeout_s: float = 120.0
    result_ttl_s: int = DEFAULT_RESULT_TTL_S
    routing: RoutingPolicy = "shared"  # see gateway/placement.py
    limits: RequestLimits = DEFAULT_LIMITS  # prompt length and guidance range, within the protocol's
    max_body_bytes: int = 64 * 1024
    # The body of a route that takes input images (gateway/inputs.py): an image and a mask, base64 or multipart.
    # Each image is held to the input limits (common/input_images.py InputLimits: 20 MiB, 4096 a side).
    max_image_body_bytes: int = 64 * 1024 * 1024
    # What the journal (gateway/journal.py) holds of the input images stored in Redis of the jobs it accepted, to
    # store them again should Redis lose them; 0: none (a job Redis lost with its inputs then fails).
    journal_input_bytes: int = 1024 * 1024 * 1024
    input_limits: InputLimits = DEFAULT_INPUT_LIMITS
    # API keys: digests from the environment (hashed at start) and/or a keys file re-read when it changes.
    # With either, every /v1 route needs a key; `public_demo` leaves the demo page's routes open without one.
    api_keys: KeyRing = _NO_KEYS
    api_keys_file: Path | None = None
    public_demo: bool = False
    trusted_proxies: tuple[IPNetwork, ...] = ()  # X-Forwarded-For is believed only from these
    rate_limits: RateLimits = _DEFAULT_RATE_LIMITS
    max_queue_depth: int = 100  # per stream, queued or in service; 0: unbounded
    # A job is accepted once the primary has it (`off`), a replica has it too (`replica`), or the primary's
    # append-only file does (`aof`, Redis 7.2+); past the timeout the submit answers 503 (common/jobstore.py).
    durable_accept: DurableAccept = "off"
    durable_accept_timeout_s: float = 1.0
    # Where images are read from (common/blobstore.py), and whether an image URL is answered with the bytes
    # (`proxy`) or a redirect to a pre-signed URL of the object store (`presigned`, S3 only).
    blob_store: str = BLOBS_IN_REDIS
    image_urls: ImageUrls = "proxy"
    # Fair share between callers while keys are configured (gateway/tenants.py), a fifth of the queue each by
    # default; 0: no cap.
    max_jobs_in_flight_per_caller: int = 20
    max_event_streams_per_caller: int = 20  # per gateway process
    # Requests held open for a result (/v1/generate, the OpenAI images route), replays included; per gateway.
    max_waiting_requests_per_caller: int = 20
    # /metrics: behind `Authorization: Bearer TOKEN` when a token is set; on its own (host, port) if given.
    metrics_token: str | None = dataclasses.field(default=None, repr=False)
    metrics_listen: tuple[str, int] | None = None
    webhooks: WebhookConfig = WebhookConfig()
    # Image URLs given out (the OpenAI route's `url`) are signed with this, shared by every gateway of the
    # cluster, and good for signed_url_ttl_s (at most the result's TTL); gateway/signed_urls.py.
    url_signing_secret: str | None = dataclasses.field(default=None, repr=False)
    signed_url_ttl_s: int = 3600
    policy: PolicyConfig = PolicyConfig()

    def __post_init__(self) -> None:
        require(self.routing in ("shared", "random", "p2c"), "--routing", "must be shared, random or p2c")
        require(1 <= self.port <= 65535, "--port", "must be 1..65535")
        require(self.request_timeout_s > 0, "--request-timeout", "must be > 0")
        require(0 < self.result_ttl_s <= MAX_RESULT_TTL_S, "--result-ttl", f"must be 1..{MAX_RESULT_TTL_S}")
        require_redis_url(self.redis_url)
        limits = self.limits
        require(
            1 <= limits.max_prompt_chars <= MAX_PROMPT_CHARS,
            "--max-prompt-chars",
            f"must be 1..{MAX_PROMPT_CHARS} (the protocol's bound, which workers re-validate against)",
        )
        require(
            MIN_GUIDANCE <= limits.min_guidance <= limits.max_guidance <= MAX_GUIDANCE,
            "--guidance-range",
            f"must be MIN..MAX within {MIN_GUIDANCE:g}..{MAX_GUIDANCE:g}",
        )
        require(1024 <= self.max_body_bytes <= 16 * 1024 * 1024, "--max-body-bytes", "must be 1 KiB..16 MiB")
        require(
            1024 <= self.max_image_body_bytes <= 256 * 1024 * 1024, "--max-image-body-bytes", "must be 1 KiB..256 MiB"
        )
        require(self.journal_input_bytes >= 0, "--journal-input-bytes", "must be >= 0 (0: keep no input images)")
        require(self.max_queue_depth >= 0, "--max-queue-depth", "must be >= 0 (0: unbounded)")
        require(
            self.durable_accept in DURABLE_ACCEPT, "--durable-accept", f"must be one of {', '.join(DURABLE_ACCEPT)}"
        )
        require(0 < self.durable_accept_timeout_s <= 60, "--durable-accept-timeout", "must be > 0 and <= 60 s")
        require_blob_store_url(self.blob_store)
        require(self.image_urls in ("proxy", "presigned"), "--image-urls", "must be proxy or presigned")
        require(
            self.image_urls == "proxy" or self.blob_store.startswith("s3://"),
            "--image-urls",
            "presigned needs an S3 --blob-store (s3://bucket/prefix)",
        )
        require(self.max_jobs_in_flight_per_caller >= 0, "--max-jobs-in-flight-per-caller", "must be >= 0 (0: off)")
        require(self.max_event_streams_per_caller >= 0, "--max-event-streams-per-caller", "must be >= 0 (0: off)")
        require(self.max_waiting_requests_per_caller >= 0, "--max-waiting-requests-per-caller", "must be >= 0 (0: off)")
        require(self.metrics_token != "", "--metrics-token", "must not be empty")
        secret = self.url_signing_secret
        require(secret is None or len(secret) >= 32, "--url-signing-secret", "must be at least 32 characters")
        require(self.signed_url_ttl_s >= 1, "--signed-url-ttl", "must be >= 1 s")

    @property
    def auth_enabled(self) -> bool:
        """Keys are configured: /v1 routes need one (the demo's, with `public_demo`, excepted)."""
        return len(self.api_keys) > 0 or self.api_keys_file is not None


def parse_networks(text: str) -> tuple[IPNetwork, ...]:
    """Comma-separated addresses or CIDR networks (`10.0.0.0/8,192.0.2.7`). Raises ValueError."""
    return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip())
