"""The gateway application: built by a factory, every shared resource under a typed key.

Each resource is created and closed by its own cleanup context; the completion listener is subscribed
before the first request is accepted.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import uuid
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web

from common.blobstore import open_blob_store
from common.config import ConfigError, log_config, mask_url, refuse_evicting_redis
from common.jobstore import JobStore
from common.redis_conn import UNAVAILABLE, connect
from common.rediskeys import RedisKeys
from common.registry import Registry
from common.streams import JobStreams
from common.webhooks import Outbox
from gateway import job_webhooks, jobs, views
from gateway.auth import KeyStore
from gateway.config import GatewayConfig
from gateway.journal import Journal
from gateway.limits import ThroughputMeter
from gateway.listener import JobListener
from gateway.metrics import GatewayMetrics, metrics_middleware
from gateway.middlewares import error_middleware, protection_middleware, rate_limit_headers
from gateway.openapi import build_openapi
from gateway.placement import Placement
from gateway.policy import Blocklist, ModerationHook, PromptPolicy
from gateway.positions import PositionBoard
from gateway.ratelimit import RateLimiter
from gateway.requestlog import AccessLogger, echo_request_id, request_id_middleware
from gateway.routes import ROUTES, setup_routes
from gateway.signed_urls import UrlSigner
from gateway.state import (
    ACCESS,
    CONFIG,
    EVENT_STREAMS,
    GATEWAY_ID,
    JOBS,
    JOURNAL,
    KEY_STORE,
    LIMITER,
    LISTENER,
    METRICS,
    OPENAPI,
    OUTBOX,
    PLACEMENT,
    POLICY,
    POSITIONS,
    REDIS,
    REGISTRY,
    STREAMS,
    THROUGHPUT,
    URL_SIGNER,
    WAITERS,
    WEBHOOK_RESOLVE,
    WEBHOOK_SENDER,
)
from gateway.tenants import EventStreams, Waiters
from gateway.webhook_sender import WebhookSender
from gateway.webhooks import system_resolve

logger = logging.getLogger(__name__)

LISTENER_READY_TIMEOUT_S = 30.0


def create_app(config: GatewayConfig) -> web.Application:
    """Build the gateway for `config`; run it with `web.run_app` or an aiohttp test client.

    Raises KeysFileError when the keys file cannot be read.
    """
    metrics = GatewayMetrics()
    # The request id comes first, so every line logged below it (and every error answer) carries it. The
    # metrics middleware counts the answers the error middleware makes, refusals by the protection
    # middleware (innermost but for the handler) included. Bodies are small JSON documents, but on the routes that
    # take input images: anything larger than a route's limit is refused, by its Content-Length before it is read,
    # else while reading (gateway/inputs.py); aiohttp's own limit is the larger of the two.
    app = web.Application(
        middlewares=[request_id_middleware, metrics_middleware(metrics), error_middleware, protection_middleware],
        client_max_size=max(config.max_body_bytes, config.max_image_body_bytes),
    )
    app[CONFIG] = config
    app[METRICS] = metrics
    app[GATEWAY_ID] = f"gw-{uuid.uuid4().hex[:8]}"
    app[KEY_STORE] = KeyStore(config)
    app[EVENT_STREAMS] = EventStreams(config.max_event_streams_per_caller)
    app[WAITERS] = Waiters(config.max_waiting_requests_per_caller)
    # A key revoked (or removed) in the keys file loses its open event streams at the next reload.
    app[KEY_STORE].on_reload.append(lambda: app[EVENT_STREAMS].end_unless(app[KEY_STORE].accepts))
    app[THROUGHPUT] = ThroughputMeter()
    app[URL_SIGNER] = UrlSigner.for_config(config)
    app[ACCESS] = {(route.method, route.path): route.access for route in ROUTES}
    app[WEBHOOK_RESOLVE] = system_resolve
    app.cleanup_ctx.extend(
        [
            _redis_ctx,
            _webhooks_ctx,
            _listener_ctx,
            _journal_ctx,
            _positions_ctx,
            _keys_ctx,
            _policy_ctx,
            _metrics_site_ctx,
        ]
    )
    app.on_response_prepare.extend([_no_stale_pages, rate_limit_headers, echo_request_id])
    setup_routes(app)
    app[OPENAPI] = build_openapi(ROUTES, config)
    return app


async def _no_stale_pages(request: web.Request, response: web.StreamResponse) -> None:
    """The page and its assets revalidate, so a deploy is seen at the next load."""
    if request.path == "/" or request.path.startswith("/static/"):
        response.headers["Cache-Control"] = "no-cache"


async def _redis_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    redis = connect(
        config.redis_url, name=f"sdxl-gateway:{app[GATEWAY_ID]}", allow_evicting=config.allow_evicting_redis
    )
    await refuse_evicting_redis(redis)
    keys = RedisKeys(config.key_prefix)
    app[REDIS] = redis
    blobs = open_blob_store(config.blob_store)
    app[JOBS] = JobStore(
        redis,
        keys,
        config.durable_accept,
        durable_timeout_ms=int(config.durable_accept_timeout_s * 1000),
        blobs=blobs,
    )
    await _check_durability(app[JOBS])
    app[STREAMS] = JobStreams(redis, keys)
    app[REGISTRY] = Registry(redis, keys)
    app[PLACEMENT] = Placement(config.routing, redis, keys)
    app[LIMITER] = RateLimiter(redis, keys)
    yield
    await redis.aclose()
    if blobs is not None:
        await blobs.close()


async def _check_durability(jobs: JobStore) -> None:
    """Refuse to start when the server cannot give the durability asked for; a Redis not reachable yet is
    no reason to stop (submits answer 503 until it is)."""
    try:
        await jobs.check_durability()
    except UNAVAILABLE as exc:
        logger.warning("could not check Redis for --durable-accept (%s); checking at each submit", exc)


async def _webhooks_ctx(app: web.Application) -> AsyncIterator[None]:
    """Send the cluster's due webhook messages (any gateway sends any job's), for the app's lifetime."""
    outbox = Outbox(app[REDIS], RedisKeys(app[CONFIG].key_prefix))
    app[OUTBOX] = outbox

    async def body_of(job_id: str, event: str) -> bytes:
        found = await jobs.read_state(app, job_id)
        return job_webhooks.webhook_body(app, job_id, event, found[0] if found is not None else None)

    sender = WebhookSender(
        outbox,
        app[CONFIG].webhooks,
        app[GATEWAY_ID],
        app[WEBHOOK_RESOLVE],
        body_of,
        lambda spec: job_webhooks.signing_secret(app, spec),
        app[METRICS],
    )
    app[WEBHOOK_SENDER] = sender
    task = asyncio.create_task(sender.run(), name="webhook-sender")
    yield
    sender.stop()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _listener_ctx(app: web.Application) -> AsyncIterator[None]:
    throughput, sender = app[THROUGHPUT], app[WEBHOOK_SENDER]

    def completed() -> None:  # a job ended somewhere: count it, and look for its webhook at once
        throughput.record()
        sender.wake()

    listener = JobListener(app[REDIS], RedisKeys(app[CONFIG].key_prefix), on_completion=completed)
    app[LISTENER] = listener
    task = asyncio.create_task(listener.run(), name="completion-listener")
    if await _redis_reachable(app):
        await asyncio.wait_for(listener.subscribed.wait(), LISTENER_READY_TIMEOUT_S)
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _redis_reachable(app: web.Application) -> bool:
    """Whether Redis answers now. If not, the gateway starts anyway and says so: it serves /healthz, answers
    /readyz and submits 503 meanwhile, and its listener keeps trying with backoff until Redis is there."""
    try:
        await app[REDIS].ping()
    except UNAVAILABLE as exc:
        logger.warning(
            "waiting for Redis at %s (%s): not ready until it answers (check --redis-url, or start Redis)",
            mask_url(app[CONFIG].redis_url),
            exc,
        )
        return False
    return True


async def _journal_ctx(app: web.Application) -> AsyncIterator[None]:
    """The jobs this gateway accepted, queued again should Redis lose them."""
    config = app[CONFIG]
    keys = RedisKeys(config.key_prefix)
    journal = Journal(app[JOBS], keys, app[REDIS], input_bytes=config.journal_input_bytes, outbox=app[OUTBOX])
    app[JOURNAL] = journal
    task = asyncio.create_task(journal.run(), name="accepted-jobs")
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _positions_ctx(app: web.Application) -> AsyncIterator[None]:
    board = PositionBoard(app[STREAMS])
    app[POSITIONS] = board
    task = asyncio.create_task(board.run(), name="queue-positions")
    yield
    board.stop()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _keys_ctx(app: web.Application) -> AsyncIterator[None]:
    """Re-read the keys file whenever it changes, for the app's lifetime."""
    store = app[KEY_STORE]
    task = asyncio.create_task(store.watch(), name="api-keys-reload") if app[CONFIG].api_keys_file else None
    yield
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _policy_ctx(app: web.Application) -> AsyncIterator[None]:
    """The prompt policy: its blocklist re-read on change and on SIGHUP, its hook's HTTP session."""
    config = app[CONFIG].policy
    blocklist = Blocklist(config.blocklist) if config.blocklist is not None else None
    session = aiohttp.ClientSession() if config.moderation_url is not None else None
    hook = None
    if config.moderation_url is not None and session is not None:
        hook = ModerationHook(config.moderation_url, config.moderation_timeout_s, config.moderation_fail, session)
    app[POLICY] = PromptPolicy(blocklist, hook)
    watch = asyncio.create_task(blocklist.watch(), name="prompt-blocklist-reload") if blocklist else None
    hup = blocklist is not None and _on_sighup(blocklist.hangup)
    yield
    if hup:
        asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
    if watch is not None:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
    if session is not None:
        await session.close()


def _on_sighup(callback: Callable[[], object]) -> bool:
    """Call `callback` on SIGHUP; False where signals cannot be handled (not the main thread)."""
    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, callback)
    except (RuntimeError, NotImplementedError, ValueError) as exc:
        logger.warning("no SIGHUP reload of the prompt blocklist here (%s); it is still re-read on change", exc)
        return False
    return True


async def _metrics_site_ctx(app: web.Application) -> AsyncIterator[None]:
    """With `--metrics-listen`, serve /metrics on its own address (and only there) for the app's lifetime."""
    listen = app[CONFIG].metrics_listen
    if listen is None:
        yield
        return
    site_app = web.Application(middlewares=[error_middleware])

    async def handler(request: web.Request) -> web.Response:
        return await views.metrics_response(app, request)

    site_app.router.add_get("/metrics", handler)
    runner = web.AppRunner(site_app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, *listen).start()
    logger.info("serving /metrics on %s:%d", *listen)
    yield
    await runner.cleanup()


def serve(config: GatewayConfig) -> None:
    """Run the gateway until SIGINT or SIGTERM. Raises ConfigError when its --port is taken."""
    log_config(logger, config)
    try:
        web.run_app(
            create_app(config),
            host=config.host,
            port=config.port,
            print=None,
            access_log_class=AccessLogger,
            shutdown_timeout=config.request_timeout_s,
        )
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        raise ConfigError(
            f"--port {config.port}: {config.host}:{config.port} is in use by another process (another gateway, or "
            "a running `sdxl-serve up`?); pass a free --port, or stop that process"
        ) from exc
