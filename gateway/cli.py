"""`sdxl-serve gateway`: the gateway's flags, read into a GatewayConfig whose defaults they show."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from common.config import ConfigError, add_blob_store_argument, add_eviction_argument, add_redis_arguments
from common.jobstore import DURABLE_ACCEPT
from common.protocol import MAX_GUIDANCE, MAX_PROMPT_CHARS, MIN_GUIDANCE, RequestLimits
from gateway.config import GatewayConfig, IPNetwork, PolicyConfig, RateLimits, WebhookConfig, parse_networks
from gateway.ratelimit import Rate

_DEFAULTS = GatewayConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every flag of `sdxl-serve gateway`."""
    add_redis_arguments(parser)
    add_eviction_argument(parser)
    parser.add_argument("--host", default=GatewayConfig.host)
    parser.add_argument("--port", type=int, default=GatewayConfig.port)
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=GatewayConfig.request_timeout_s,
        help="seconds /v1/generate waits before answering 504 with the job id",
    )
    parser.add_argument(
        "--result-ttl", type=int, default=GatewayConfig.result_ttl_s, help="seconds results stay fetchable"
    )
    add_routing_argument(parser)
    _add_storage(parser)
    _add_protection(parser)
    add_policy_arguments(parser)
    _add_webhooks(parser)
    _add_url_signing(parser)


def _add_storage(parser: argparse.ArgumentParser) -> None:
    """When a job counts as accepted, and where its images are read from."""
    group = parser.add_argument_group("storage")
    group.add_argument(
        "--durable-accept",
        choices=DURABLE_ACCEPT,
        default=GatewayConfig.durable_accept,
        help="answer a submit only once a replica (WAIT) or the primary's append-only file (WAITAOF, Redis "
        "7.2+) holds the job; past --durable-accept-timeout the submit is a 503 with Retry-After, to be "
        "retried with the same Idempotency-Key",
    )
    group.add_argument(
        "--durable-accept-timeout",
        type=float,
        default=GatewayConfig.durable_accept_timeout_s,
        help="seconds a submit waits for that confirmation",
    )
    add_blob_store_argument(group, GatewayConfig.blob_store)
    group.add_argument(
        "--image-urls",
        choices=["proxy", "presigned"],
        default=GatewayConfig.image_urls,
        help="proxy: the gateway streams each image from the store; presigned: it redirects (307) to a "
        "pre-signed URL of the object store, valid as long as the result (S3 stores only)",
    )


def add_routing_argument(parser: argparse.ArgumentParser) -> None:
    """`--routing`, which `sdxl-serve up` passes on to its gateway."""
    parser.add_argument(
        "--routing",
        default=GatewayConfig.routing,
        choices=["shared", "random", "p2c"],
        help="shared: idle workers pull from one queue per shape (default); random: a random "
        "worker's own queue (the reference's policy); p2c: the shorter of two random ones",
    )


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or Ctrl-C."""
    from gateway.app import serve

    serve(gateway_config(args))
    return 0


def gateway_config(args: argparse.Namespace) -> GatewayConfig:
    """The GatewayConfig the flags (and SDXL_SERVE_API_KEYS) describe; ConfigError names a bad one."""
    from common.apikeys import KeyRing, KeysFileError, load_keys_file, split_keys

    low, high = args.guidance_range
    rates = RateLimits(**{f.name: getattr(args, f"rate_limit_{f.name}") for f in dataclasses.fields(RateLimits)})
    # Keys from the environment are hashed here and never kept: the config holds digests only.
    keys = KeyRing.from_keys(split_keys(os.environ.get("SDXL_SERVE_API_KEYS", "")))
    if args.api_keys_file:
        try:  # fail at start, naming the flag, rather than when the app is built
            load_keys_file(Path(args.api_keys_file))
        except KeysFileError as exc:
            raise ConfigError(f"--api-keys-file: {exc}") from None
    return GatewayConfig(
        redis_url=args.redis_url,
        allow_evicting_redis=args.allow_evicting_redis,
        host=args.host,
        port=args.port,
        key_prefix=args.key_prefix,
        request_timeout_s=args.request_timeout,
        result_ttl_s=args.result_ttl,
        routing=args.routing,
        limits=RequestLimits(max_prompt_chars=args.max_prompt_chars, min_guidance=low, max_guidance=high),
        max_body_bytes=args.max_body_bytes,
        max_image_body_bytes=args.max_image_body_bytes,
        journal_input_bytes=args.journal_input_bytes,
        api_keys=keys,
        api_keys_file=Path(args.api_keys_file) if args.api_keys_file else None,
        public_demo=args.public_demo,
        trusted_proxies=args.trusted_proxies,
        rate_limits=rates,
        max_queue_depth=args.max_queue_depth,
        durable_accept=args.durable_accept,
        durable_accept_timeout_s=args.durable_accept_timeout,
        blob_store=args.blob_store,
        image_urls=args.image_urls,
        max_jobs_in_flight_per_caller=args.max_jobs_in_flight_per_caller,
        max_event_streams_per_caller=args.max_event_streams_per_caller,
        max_waiting_requests_per_caller=args.max_waiting_requests_per_caller,
        metrics_token=args.metrics_token,
        metrics_listen=args.metrics_listen,
        webhooks=webhook_config(args),
        url_signing_secret=args.url_signing_secret or None,
        signed_url_ttl_s=args.signed_url_ttl,
        policy=policy_config(args),
    )


def policy_config(args: argparse.Namespace) -> PolicyConfig:
    """The prompt policy's flags as a PolicyConfig; a blocklist that does not parse fails at start, naming it."""
    from gateway.policy import BlocklistError, load_blocklist

    if args.prompt_blocklist is not None:
        try:
            load_blocklist(args.prompt_blocklist)
        except BlocklistError as exc:
            raise ConfigError(f"--prompt-blocklist: {exc}") from None
    return PolicyConfig(
        blocklist=args.prompt_blocklist,
        moderation_url=args.moderation_url,
        moderation_timeout_s=args.moderation_timeout,
        moderation_fail=args.moderation_fail,
    )


def add_policy_arguments(parser: argparse.ArgumentParser) -> None:
    """The prompt policy's flags, which `sdxl-serve up` passes on to its gateway (docs/safety.md)."""
    env, d = os.environ.get, PolicyConfig()
    group = parser.add_argument_group("prompt policy")
    group.add_argument(
        "--prompt-blocklist",
        type=Path,
        default=env("SDXL_SERVE_PROMPT_BLOCKLIST"),
        metavar="FILE",
        help="refuse (400 prompt_rejected) prompts and negative prompts matching a line of FILE: a word or "
        "phrase, or re:REGEX; compared after NFKC and case folding; re-read on change and on SIGHUP "
        "(env SDXL_SERVE_PROMPT_BLOCKLIST)",
    )
    group.add_argument(
        "--moderation-url",
        default=env("SDXL_SERVE_MODERATION_URL"),
        help="POST each request's prompts as JSON to this URL before queueing; an answer "
        '{"flagged": true} refuses it (env SDXL_SERVE_MODERATION_URL)',
    )
    group.add_argument(
        "--moderation-timeout", type=float, default=d.moderation_timeout_s, help="seconds one moderation call may take"
    )
    group.add_argument(
        "--moderation-fail",
        choices=["open", "closed"],
        default=d.moderation_fail,
        help="when the moderation service times out or fails: closed refuses the request (503), open lets it through",
    )


def webhook_config(args: argparse.Namespace) -> WebhookConfig:
    """The webhook flags as a WebhookConfig; the cluster secret from its flag, env or file."""
    secret = args.webhook_secret
    if args.webhook_secret_file:
        try:
            secret = Path(args.webhook_secret_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"--webhook-secret-file: cannot read it: {exc}") from None
    hosts = frozenset(h.strip().lower().strip("[]") for h in args.webhook_allow_hosts.split(",") if h.strip())
    return WebhookConfig(
        allow_http=args.webhook_allow_http,
        allow_hosts=hosts,
        secret=secret or None,
        timeout_s=args.webhook_timeout,
        retry_window_s=args.webhook_retry_window,
        backoff_s=args.webhook_backoff,
        max_backoff_s=args.webhook_max_backoff,
        jitter=args.webhook_jitter,
        max_retry_after_s=args.webhook_max_retry_after,
        concurrency=args.webhook_concurrency,
        max_outbox=args.webhook_max_outbox,
        poll_s=args.webhook_poll,
        public_url=args.public_url,
    )


def _guidance_range(text: str) -> tuple[float, float]:
    low, sep, high = text.partition("..")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is not MIN..MAX, e.g. 1..15")
    try:
        return float(low), float(high)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not MIN..MAX, e.g. 1..15") from None


def _rate_arg(text: str) -> Rate | None:
    try:
        return Rate.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _networks_arg(text: str) -> tuple[IPNetwork, ...]:
    try:
        return parse_networks(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an address or CIDR network: {exc}") from None


def _add_protection(parser: argparse.ArgumentParser) -> None:
    """Validation bounds, API keys, client addresses, rate limits and backpressure (docs/security.md)."""
    group = parser.add_argument_group("protection")
    _add_request_bounds(group)
    _add_access(group)
    group.add_argument(
        "--max-queue-depth",
        type=int,
        default=GatewayConfig.max_queue_depth,
        help="jobs queued or in service per stream beyond which submits get 429 (0: unbounded)",
    )
    _add_tenants(group)
    _add_rate_limits(group)


def _add_request_bounds(group: argparse._ArgumentGroup) -> None:
    """What one request may carry (prompt, guidance, body sizes) and the memory kept for its input images."""
    limits = _DEFAULTS.limits
    group.add_argument(
        "--max-prompt-chars",
        type=int,
        default=limits.max_prompt_chars,
        help=f"longest prompt or negative prompt accepted (at most {MAX_PROMPT_CHARS})",
    )
    group.add_argument(
        "--guidance-range",
        type=_guidance_range,
        default=(limits.min_guidance, limits.max_guidance),
        metavar="MIN..MAX",
        help=f"guidance_scale accepted (within {MIN_GUIDANCE:g}..{MAX_GUIDANCE:g})",
    )
    group.add_argument(
        "--max-body-bytes",
        type=int,
        default=GatewayConfig.max_body_bytes,
        help="larger request bodies are refused (413) before they are read",
    )
    group.add_argument(
        "--max-image-body-bytes",
        type=int,
        default=GatewayConfig.max_image_body_bytes,
        help="the same for the routes that take input images (an image and a mask, base64 or multipart)",
    )
    group.add_argument(
        "--journal-input-bytes",
        type=int,
        default=GatewayConfig.journal_input_bytes,
        help="memory for copies of the input images stored in Redis of the jobs this gateway accepted and that "
        "are not done, to store them again should Redis lose them (the oldest dropped first past it; 0: none)",
    )


def _add_access(group: argparse._ArgumentGroup) -> None:
    """Who may call: API keys, the demo page's open routes, and which proxies' X-Forwarded-For is believed."""
    env = os.environ.get
    group.add_argument(
        "--api-keys-file",
        type=Path,
        default=env("SDXL_SERVE_API_KEYS_FILE"),
        help="file of SHA-256 digests of accepted keys, one per line, `revoked` after a digest to "
        "refuse it with 403, `admin` to let it see every caller's jobs; re-read when it changes "
        "(env SDXL_SERVE_API_KEYS_FILE). Keys can "
        "also come from env SDXL_SERVE_API_KEYS (comma-separated). With any, /v1 needs a key",
    )
    group.add_argument(
        "--public-demo",
        action=argparse.BooleanOptionalAction,
        default=env("SDXL_SERVE_PUBLIC_DEMO", "") in ("1", "true", "yes"),
        help="with keys configured, leave the demo page's routes (POST /v1/jobs, a job's status, "
        "events, images, cancel) open without a key, under the public rate limits",
    )
    group.add_argument(
        "--trusted-proxies",
        type=_networks_arg,
        default=env("SDXL_SERVE_TRUSTED_PROXIES", ""),
        metavar="CIDR,...",
        help="believe X-Forwarded-For only from these addresses or networks (env SDXL_SERVE_TRUSTED_PROXIES)",
    )


def _add_tenants(group: argparse._ArgumentGroup) -> None:
    """Fair share between callers and where /metrics is served (docs/security.md, "Tenants")."""
    group.add_argument(
        "--max-jobs-in-flight-per-caller",
        type=int,
        default=GatewayConfig.max_jobs_in_flight_per_caller,
        help="with keys configured, jobs queued or running per key (and per public address) beyond "
        "which its submits get 429 (0: no cap)",
    )
    group.add_argument(
        "--max-event-streams-per-caller",
        type=int,
        default=GatewayConfig.max_event_streams_per_caller,
        help="with keys configured, open event streams per key (and per public address) on this gateway (0: no cap)",
    )
    group.add_argument(
        "--max-waiting-requests-per-caller",
        type=int,
        default=GatewayConfig.max_waiting_requests_per_caller,
        help="with keys configured, requests waiting for their result (/v1/generate, /v1/images/generations; "
        "Idempotency-Key replays included) per key (and per public address) on this gateway (0: no cap)",
    )
    group.add_argument(
        "--metrics-token",
        default=os.environ.get("SDXL_SERVE_METRICS_TOKEN") or None,
        help="serve /metrics only with Authorization: Bearer TOKEN (env SDXL_SERVE_METRICS_TOKEN, "
        "which keeps it out of the process list)",
    )
    group.add_argument(
        "--metrics-listen",
        type=_listen_arg,
        default=os.environ.get("SDXL_SERVE_METRICS_LISTEN") or None,
        metavar="HOST:PORT",
        help="serve /metrics on this address instead of the API's port (env SDXL_SERVE_METRICS_LISTEN)",
    )


def _listen_arg(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT, e.g. 0.0.0.0:9100")
    return host.strip("[]") or "0.0.0.0", int(port)


def _add_rate_limits(group: argparse._ArgumentGroup) -> None:
    defaults = _DEFAULTS.rate_limits
    for field in dataclasses.fields(RateLimits):
        group.add_argument(
            f"--rate-limit-{field.name.replace('_', '-')}",
            dest=f"rate_limit_{field.name}",
            type=_rate_arg,
            default=getattr(defaults, field.name),
            metavar="N/UNIT[:BURST]",
            help=f"COUNT/s|m|h[:BURST] or off (default {getattr(defaults, field.name) or 'off'})",
        )


def _add_webhooks(parser: argparse.ArgumentParser) -> None:
    """Job webhooks: which targets, how they are signed and retried (docs/operations.md: Webhooks)."""
    env, d = os.environ.get, WebhookConfig()
    group = parser.add_argument_group("webhooks")
    group.add_argument("--webhook-allow-http", action="store_true", help="allow plain http webhook URLs (https only)")
    group.add_argument(
        "--webhook-allow-hosts",
        default=env("SDXL_SERVE_WEBHOOK_ALLOW_HOSTS", ""),
        metavar="HOST,...",
        help="webhook hosts (names or addresses, as in the URL) exempt from the address rules that refuse "
        "loopback, private, link-local and metadata targets (env SDXL_SERVE_WEBHOOK_ALLOW_HOSTS)",
    )
    group.add_argument(
        "--webhook-secret",
        default=env("SDXL_SERVE_WEBHOOK_SECRET"),
        help="the cluster's signing secret (whsec_...), for keys without their own in the keys file and for "
        "callers without a key (env SDXL_SERVE_WEBHOOK_SECRET; `sdxl-serve keys webhook-secret` makes one)",
    )
    group.add_argument(
        "--webhook-secret-file", default=env("SDXL_SERVE_WEBHOOK_SECRET_FILE"), help="read it from a file"
    )
    number = {"--webhook-timeout": ("timeout_s", "seconds one attempt may take")}
    number["--webhook-retry-window"] = ("retry_window_s", "seconds a message is retried after it fell due")
    number["--webhook-backoff"] = ("backoff_s", "seconds before the first retry; doubled with each attempt")
    number["--webhook-max-backoff"] = ("max_backoff_s", "the longest backoff, seconds")
    number["--webhook-jitter"] = ("jitter", "each backoff is drawn from [(1 - J) d, d] (1: full jitter)")
    number["--webhook-max-retry-after"] = ("max_retry_after_s", "a receiver's Retry-After is honoured up to this")
    number["--webhook-poll"] = ("poll_s", "the longest wait, seconds, before a gateway looks at the due set again")
    for flag, (field, text) in number.items():
        group.add_argument(flag, type=float, default=getattr(d, field), help=f"{text} (default {getattr(d, field):g})")
    group.add_argument("--webhook-concurrency", type=int, default=d.concurrency, help="attempts in flight per gateway")
    group.add_argument(
        "--webhook-max-outbox",
        type=int,
        default=d.max_outbox,
        help="jobs with webhook messages due beyond which new webhook jobs get 429 (0: unbounded)",
    )
    group.add_argument(
        "--public-url",
        default=env("SDXL_SERVE_PUBLIC_URL"),
        help="the API's public base URL (https://api.example.com): a webhook's and the OpenAI route's image URLs "
        "are made absolute with it",
    )


def _add_url_signing(parser: argparse.ArgumentParser) -> None:
    """Signed image URLs (gateway/signed_urls.py): fetched without a key for a while."""
    env = os.environ.get
    group = parser.add_argument_group("image URLs")
    group.add_argument(
        "--url-signing-secret",
        default=env("SDXL_SERVE_URL_SIGNING_SECRET"),
        help="signs the image URLs the OpenAI route gives out, so they are fetched without a key; every gateway "
        "of the cluster must have the same one (32+ characters; default: derived from --webhook-secret) "
        "(env SDXL_SERVE_URL_SIGNING_SECRET)",
    )
    group.add_argument(
        "--signed-url-ttl",
        type=int,
        default=GatewayConfig.signed_url_ttl_s,
        help="seconds a signed image URL is good for, at most --result-ttl (default %(default)s)",
    )
