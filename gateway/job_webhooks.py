"""Job webhooks as the HTTP API sees them: a request's webhook checked into the spec its job keeps, the body
each message carries (the job's status document), and a job's deliveries on its status.

The target rules and the signature are gateway/webhooks.py; sending is gateway/webhook_sender.py.
"""

from __future__ import annotations

import json
import time
from typing import Any

from aiohttp import web

from common.rediskeys import RedisKeys
from common.webhooks import Message, OutboxFull, WebhookSpec
from gateway.errors import ApiError
from gateway.schemas import GenerateRequest, JobState, WebhookDelivery, WebhookState
from gateway.state import CONFIG, KEY_STORE, OUTBOX, REDIS, WEBHOOK_RESOLVE
from gateway.tenants import caller_of
from gateway.webhooks import check_target, spec_for

OUTBOX_FULL_RETRY_S = 30  # a full outbox drains as receivers come back: not within a second


def webhook_args(webhook: WebhookSpec | None, max_outbox: int) -> dict[str, Any]:
    """JobStore.submit's arguments for a job's webhook (none without one)."""
    return {"webhook": webhook, "max_outbox": max_outbox} if webhook is not None else {}


async def webhook_of(request: web.Request, body: GenerateRequest) -> WebhookSpec | None:
    """The request's webhook, checked (its target, and a secret to sign it with), as the job keeps it."""
    if body.webhook is None:
        return None
    app = request.app
    caller = caller_of(request)
    identity = caller.identity if caller is not None and caller.caller_class == "key" else ""
    own_secret = own_webhook_secret(app, identity) is not None
    if not own_secret and app[CONFIG].webhooks.secret is None:  # before the URL: no resolving for one refused anyway
        raise ApiError(
            400,
            "webhook_no_secret",
            "webhook: no secret to sign it with: the operator gives this API key a webhook secret in the keys "
            "file, or the cluster one (--webhook-secret)",
            field="webhook",
        )
    await check_target(app[CONFIG].webhooks, app[WEBHOOK_RESOLVE], body.webhook.url)
    return spec_for(body.webhook, identity, own_secret, app[CONFIG].webhooks)


def outbox_full(exc: OutboxFull) -> ApiError:
    """429 for a webhook job while the outbox is full: it drains as receivers come back, not within a second."""
    return ApiError(
        429,
        "webhook_outbox_full",
        f"{exc.depth} jobs have webhooks waiting to be delivered (at most {exc.max_depth}); retry later, "
        "or submit without a webhook",
        field="webhook",
        headers={"Retry-After": str(OUTBOX_FULL_RETRY_S)},
    )


def own_webhook_secret(app: web.Application, identity: str) -> str | None:
    """A key's own webhook secret on this gateway ('': no key, so none)."""
    return app[KEY_STORE].ring.webhook_secret(identity) if identity else None


def signing_secret(app: web.Application, spec: WebhookSpec) -> str | None:
    """The secret that signs a message of `spec` on this gateway, as now in its keys file or flags: the key's
    own or the cluster's, whichever was decided at submit; None when this gateway has not got it."""
    if spec.own_secret is None:  # a spec from before the choice was recorded: the key's own, else the cluster's
        return own_webhook_secret(app, spec.key) or app[CONFIG].webhooks.secret
    return own_webhook_secret(app, spec.key) if spec.own_secret else app[CONFIG].webhooks.secret


def webhook_body(app: web.Application, job_id: str, event: str, state: JobState | None) -> bytes:
    """A webhook's body: the event's type and the job's status document (`state`, as `GET /v1/jobs/{id}` shows
    it now; None for a job gone), image URLs made absolute with `--public-url` when set."""
    base = app[CONFIG].webhooks.public_url
    if state is not None and state.result is not None and base:
        images = [base.rstrip("/") + path for path in state.result.images]
        state = state.model_copy(update={"result": state.result.model_copy(update={"images": images})})
    data = state.model_dump(mode="json", exclude_none=True) if state is not None else {"id": job_id}
    timestamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return json.dumps({"type": f"job.{event}", "timestamp": timestamp, "data": data}).encode()


async def webhook_state(app: web.Application, job_id: str) -> WebhookState | None:
    """A job's webhook and its deliveries so far; None for a job without one."""
    raw = await app[REDIS].hget(RedisKeys(app[CONFIG].key_prefix).job(job_id), "webhook")
    spec = WebhookSpec.from_json(raw) if raw is not None else None
    if spec is None:
        return None
    deliveries = [_delivery(message) for message in await app[OUTBOX].messages(job_id)]
    return WebhookState(url=spec.url, events=list(spec.events), deliveries=deliveries)


def _delivery(message: Message) -> WebhookDelivery:
    def seconds(ms: int | None) -> float | None:
        return None if ms is None else ms / 1000

    return WebhookDelivery(
        id=message.id,
        event=message.event,
        attempts=message.attempts,
        last_status=message.last_status,
        last_error=message.last_error,
        last_attempt_at=seconds(message.last_attempt_ms),
        next_attempt_at=seconds(message.next_ms),
        delivered_at=seconds(message.delivered_ms),
        gave_up_at=seconds(message.gave_up_ms),
    )
