"""Sending job webhooks: every gateway runs a `WebhookSender`, taking due messages from the outbox in Redis
under a lease and POSTing them, signed.

An attempt is one POST, redirects not followed, within `--webhook-timeout`; of the answer only the status
counts (at most MAX_ANSWER_BYTES of its body are read). A 2xx answer delivers the message.
A timeout, a connection error, a 5xx, a 408, a 425 or a 429 is retried after an exponential backoff with jitter
(a 429's or 503's `Retry-After` is honoured, up to a cap), until the message has been due for `--webhook-retry-window`;
any other answer (a 4xx such as 410, a redirect) gives it up at once, as does a target the address rules
refuse at the time of the attempt. Every attempt of a message carries the same `webhook-id` and body, and a
fresh `webhook-timestamp` and signature. A gateway that dies holding a lease delays its messages by the
lease; another gateway sends them then (at least once: the receiver deduplicates by `webhook-id`).

What a message needs is decided at submit and travels with it (common/webhooks.py `WebhookSpec`); what a
gateway holds may differ from another's (during a rolling change of secrets, keys files or allow-lists). A
gateway without the signing secret of the message's key, or without the allow-listing of a host that was
allow-listed where the job was accepted, makes no attempt: it leaves the message to the other gateways, due
again after a backoff, counted in `sdxl_webhook_skips_total{reason}` and logged. Only once the retry window
is spent is such a message given up.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
from yarl import URL

from common.redis_conn import UNAVAILABLE
from common.webhooks import Outbox, Outcome, Taken, WebhookSpec
from gateway.config import WebhookConfig
from gateway.metrics import GatewayMetrics
from gateway.webhooks import (
    GuardedResolver,
    Resolve,
    TargetRefused,
    allow_listed,
    checked_addresses,
    literal_address,
    signed_headers,
)

logger = logging.getLogger(__name__)

# What the sender needs from the gateway: a message's body (job id, event), a spec's signing secret.
BodyOf = Callable[[str, str], Awaitable[bytes]]
SecretOf = Callable[[WebhookSpec], str | None]
RETRIED_STATUSES = frozenset({408, 425, 429})
BODY_ERROR_CHARS = 200
# Of a receiver's answer only the status counts: at most this much of its body is read, so a receiver that
# answers with a huge or endless body cannot fill a gateway's memory (nor hold an attempt open).
MAX_ANSWER_BYTES = 4096


@dataclass(frozen=True)
class Attempt:
    """How one attempt went, as the outbox records it."""

    outcome: Outcome
    status: int | None = None
    error: str = ""
    retry_ms: int = 0


class WebhookSender:
    """Take due messages and send them, `config.concurrency` at a time, until cancelled."""

    def __init__(
        self,
        outbox: Outbox,
        config: WebhookConfig,
        owner: str,
        resolve: Resolve,
        body_of: BodyOf,
        secret_of: SecretOf,
        metrics: GatewayMetrics,
    ) -> None:
        self._outbox = outbox
        self._config = config
        self._owner = owner
        self._resolve = resolve
        self._body_of = body_of
        self._secret_of = secret_of
        self._metrics = metrics
        self._wake = asyncio.Event()
        self._stopping = False
        self._in_flight: set[asyncio.Task[None]] = set()

    def wake(self) -> None:
        """Look at the due set now (a job just ended somewhere in the cluster)."""
        self._wake.set()

    async def run(self) -> None:
        """Send until cancelled; in-flight attempts are cancelled with it (their leases run out)."""
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(self._config, self._resolve))
        timeout = aiohttp.ClientTimeout(total=self._config.timeout_s)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as session:
            try:
                # Not `while True`: a cancellation that one of the awaits below swallows (3.11's timeouts and
                # client libraries can) must not keep the loop running after `stop`.
                while not self._stopping:
                    await self._round(session)
            finally:
                for task in self._in_flight:
                    task.cancel()
                await asyncio.gather(*self._in_flight, return_exceptions=True)

    def stop(self) -> None:
        """Make `run` return after its current round (call before cancelling its task)."""
        self._stopping = True
        self._wake.set()

    async def _round(self, session: aiohttp.ClientSession) -> None:
        """Take what is due (as many as there is room for) and start sending it; then wait for a reason to
        look again: a completion, a free slot, the next due time or the poll interval."""
        self._wake.clear()
        free = self._config.concurrency - len(self._in_flight)
        wait_s = self._config.poll_s
        try:
            if free > 0:
                for taken in await self._outbox.take(self._owner, free, self._config.lease_ms):
                    self._start(session, taken)
            if len(self._in_flight) < self._config.concurrency:
                due_ms = await self._outbox.wait_ms()
                wait_s = wait_s if due_ms is None else min(wait_s, due_ms / 1000)
        except UNAVAILABLE as exc:
            logger.warning("webhook outbox not read (%s)", exc)
        # A finished attempt sets the wake too: with every slot taken, that is the reason to look again.
        # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation that meets the wake.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):
                await self._wake.wait()

    def _start(self, session: aiohttp.ClientSession, taken: Taken) -> None:
        task = asyncio.create_task(self._deliver(session, taken), name=f"webhook-{taken.message.id}")
        self._in_flight.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._wake.set()  # a slot is free
        if not task.cancelled() and task.exception() is not None:
            logger.error("webhook delivery failed unexpectedly", exc_info=task.exception())

    async def _deliver(self, session: aiohttp.ClientSession, taken: Taken) -> None:
        """One attempt of a leased message, recorded in the outbox (unless the lease was lost meanwhile); none
        when this gateway lacks what the message needs: then it is left to another gateway."""
        message = taken.message
        secret = self._secret_of(taken.spec)
        inability = self._inability(taken.spec, secret)
        if inability is not None:
            await self._leave(taken, *inability)
            return
        body = taken.body or await self._body_of(taken.job_id, message.event)
        started = time.perf_counter()
        attempt = await self._attempt(session, taken, body, secret)
        self._metrics.webhook_attempt_seconds.observe(time.perf_counter() - started)
        recorded = await self._record(taken, attempt, body)
        self._metrics.webhook_attempts.labels(message.event, recorded).inc()
        if recorded == "delivered":
            lag_s = max(0.0, time.time() - message.created_ms / 1000)
            self._metrics.webhook_lag_seconds.observe(lag_s)
        log = logger.debug if attempt.outcome == "delivered" else logger.warning
        log(
            "webhook %s (%s of job %s): %s after attempt %d%s",
            message.id, message.event, taken.job_id, recorded, message.attempts + 1,
            f" ({attempt.error or attempt.status})" if attempt.outcome != "delivered" else "",
            extra={"job_id": taken.job_id},
        )  # fmt: skip

    async def _record(self, taken: Taken, attempt: Attempt, body: bytes) -> str:
        """Record `attempt` in the outbox: its outcome, or `stale` (the lease was lost, or Redis is away)."""
        try:
            recorded: str = await self._outbox.done(
                taken, attempt.outcome, attempt.status, attempt.error, attempt.retry_ms, self._keep_s(), body
            )
        except UNAVAILABLE as exc:  # the lease runs out and the message is sent again: at least once
            logger.warning("webhook %s: attempt not recorded (%s)", taken.message.id, exc)
            recorded = "stale"
        return recorded

    def _inability(self, spec: WebhookSpec, secret: str | None) -> tuple[str, str] | None:
        """Why this gateway cannot send a message that another gateway may (a metric label, and words), or None.
        The message's own properties (its URL, its key) were decided at submit; what a gateway holds (secrets,
        its allow-list) may differ between gateways, as during a rolling change of their configuration."""
        if not spec.url:
            return None  # nothing to send it to, anywhere: the attempt gives it up
        if secret is None:
            signer = (
                f"key {spec.key}" if spec.key and spec.own_secret is not False else "the cluster (--webhook-secret)"
            )
            return "no_secret", f"this gateway has no webhook signing secret for {signer}"
        if spec.allowed and not allow_listed(self._config, spec.url):
            return "not_allow_listed", "its host was allow-listed where the job was accepted, not on this gateway"
        return None

    async def _leave(self, taken: Taken, reason: str, why: str) -> None:
        """Leave a message this gateway cannot send to the others: no attempt, due again after a backoff (the
        message counts its skips). Past the retry window no gateway sent it in time: it is given up."""
        config, message = self._config, taken.message
        ceiling = min(config.max_backoff_s, 2 * config.poll_s * 2 ** min(message.skips, 32))
        delay_s = ceiling * (1 - config.jitter * random.random())
        if taken.now_ms + delay_s * 1000 > message.created_ms + config.retry_window_s * 1000:
            attempt = Attempt("gave-up", error=f"no gateway sent it within {config.retry_window_s:g} s: {why}")
        else:
            attempt = Attempt("skip", error=why, retry_ms=int(delay_s * 1000))
        recorded = await self._record(taken, attempt, b"")
        if recorded == "skip":
            self._metrics.webhook_skips.labels(reason).inc()
        else:
            self._metrics.webhook_attempts.labels(message.event, recorded).inc()
        logger.warning(
            "webhook %s (%s of job %s): %s: %s",
            message.id, message.event, taken.job_id,
            "left to another gateway" if attempt.outcome == "skip" else recorded, attempt.error,
            extra={"job_id": taken.job_id},
        )  # fmt: skip

    def _keep_s(self) -> int:
        """How long a job's outbox outlives its last message: long enough to read on its status."""
        return int(self._config.retry_window_s) + 3600

    async def _attempt(self, session: aiohttp.ClientSession, taken: Taken, body: bytes, secret: str | None) -> Attempt:
        spec = taken.spec
        if not spec.url or secret is None:
            return Attempt("gave-up", error="no target (its webhook does not parse)")
        url = URL(spec.url)
        try:
            if literal_address(url.host or "") is not None:  # aiohttp asks no resolver about an address
                await checked_addresses(self._config, self._resolve, url.host or "", url.port or 443)
            headers = signed_headers(secret, taken.message.id, int(time.time()), body)
            async with session.post(url, data=body, headers=headers, allow_redirects=False) as response:
                await _skim(response)
                return self._judge(taken, response.status, response.headers.get("Retry-After"))
        except TargetRefused as exc:
            return Attempt("gave-up", error=str(exc))
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, TargetRefused):
                return Attempt("gave-up", error=str(exc.os_error))
            return self._retry(taken, None, f"cannot connect: {exc.os_error}", None)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return self._retry(taken, None, f"{type(exc).__name__}: {exc}"[:BODY_ERROR_CHARS] or "timed out", None)

    def _judge(self, taken: Taken, status: int, retry_after: str | None) -> Attempt:
        if 200 <= status < 300:
            return Attempt("delivered", status)
        if status >= 500 or status in RETRIED_STATUSES:
            return self._retry(taken, status, f"HTTP {status}", retry_after)
        note = " (redirects are not followed)" if 300 <= status < 400 else ""
        return Attempt("gave-up", status, f"HTTP {status}{note}")

    def _retry(self, taken: Taken, status: int | None, error: str, retry_after: str | None) -> Attempt:
        """A retry after the backoff (or the receiver's Retry-After), unless that is past the retry window."""
        config = self._config
        attempts = taken.message.attempts + 1
        ceiling = min(config.max_backoff_s, config.backoff_s * 2 ** (attempts - 1))
        delay_s = ceiling * (1 - config.jitter * random.random())
        asked = retry_after_s(retry_after)
        if asked is not None:
            delay_s = min(asked, config.max_retry_after_s)
        window_end_ms = taken.message.created_ms + config.retry_window_s * 1000
        if taken.now_ms + delay_s * 1000 > window_end_ms:
            return Attempt("gave-up", status, f"{error}; retried for {config.retry_window_s:g} s")
        return Attempt("retry", status, error, int(delay_s * 1000))


async def _skim(response: aiohttp.ClientResponse) -> None:
    """Read at most MAX_ANSWER_BYTES of an answer's body; close the connection on a longer one (a short one
    read to its end leaves the connection to be used again)."""
    await response.content.read(MAX_ANSWER_BYTES)
    if not response.content.at_eof():
        response.close()


def retry_after_s(value: str | None) -> float | None:
    """A `Retry-After` in seconds (delta or HTTP date); None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
