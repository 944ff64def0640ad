"""Job webhooks as stored: a job's webhook spec, its outbox of messages, and the scripts that lease and settle
their deliveries.

A job submitted with a webhook keeps its spec in its record. The scripts that start, advance and end a job make
its events due in the same step (common/lua/include/webhook.lua): a message joins the job's outbox (a hash,
`RedisKeys.webhook`) and the job enters the due set, scored by when a gateway may take it. Any gateway takes
due messages under a lease (`Outbox.take`) and records each attempt (`Outbox.done`): the head of one job's
outbox is in flight at most once, messages of one job go out in order, and a gateway that dies only delays its
messages by the lease. Sending them is the gateway's (gateway/webhooks.py).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Literal, get_args

import redis.asyncio as aioredis

from common.redis_conn import text
from common.rediskeys import RedisKeys
from common.scripts import register

logger = logging.getLogger(__name__)

WebhookEvent = Literal["completed", "started", "progress"]
WEBHOOK_EVENTS: tuple[str, ...] = get_args(WebhookEvent)
# `skip`: not an attempt; the gateway that took the message cannot send it, and leaves it to another.
Outcome = Literal["delivered", "retry", "gave-up", "skip"]


class OutboxFull(Exception):
    """The outbox holds its maximum of jobs with messages due; a job with a webhook was not queued."""

    def __init__(self, depth: int, max_depth: int) -> None:
        super().__init__(f"{depth} jobs have webhook messages due (at most {max_depth})")
        self.depth = depth
        self.max_depth = max_depth


@dataclass(frozen=True)
class WebhookSpec:
    """What a job's webhook messages need, decided at submit and carried with them: where they go, which events,
    `key` the API key that submitted them (its identity, never the key; '' for none), `own_secret` whether that
    key's own secret signs them (else the cluster's; None in a spec from before this was recorded: the key's
    own if the gateway has one, else the cluster's), and `allowed`, whether the host was on the accepting
    gateway's `--webhook-allow-hosts` (then the address rules were not applied to it). A gateway without the
    secret, or without the allow-listing of an `allowed` host, cannot send them: it leaves them to another
    (gateway/webhook_sender.py)."""

    url: str
    events: tuple[str, ...] = ("completed",)
    key: str = ""
    allowed: bool = False
    own_secret: bool | None = None

    def to_json(self) -> str:
        data: dict[str, Any] = {"url": self.url, "events": list(self.events), "key": self.key}
        if self.allowed:
            data["allowed"] = True
        if self.own_secret is not None:
            data["own_secret"] = self.own_secret
        return json.dumps(data)

    def events_field(self) -> str:
        """The events as the scripts look them up: `,completed,started,`."""
        return "," + ",".join(self.events) + ","

    @classmethod
    def from_json(cls, raw: bytes | str) -> WebhookSpec | None:
        """The stored spec; None (logged) for one that does not parse."""
        try:
            data = json.loads(raw)
            return cls(
                url=str(data["url"]),
                events=tuple(map(str, data["events"])),
                key=str(data.get("key", "")),
                allowed=data.get("allowed") is True,
                own_secret=data["own_secret"] if isinstance(data.get("own_secret"), bool) else None,
            )
        except (ValueError, KeyError, TypeError):
            logger.warning("a webhook spec that does not parse: %r", raw[:200])
            return None


@dataclass(frozen=True)
class Message:
    """One event of a job's webhook and its deliveries so far (times in Redis ms)."""

    id: str  # the `webhook-id` of every attempt
    event: str
    attempts: int
    created_ms: int
    skips: int = 0  # times a gateway that could not send it left it to another (not attempts)
    last_attempt_ms: int | None = None
    last_status: int | None = None
    last_error: str | None = None
    next_ms: int | None = None
    delivered_ms: int | None = None
    gave_up_ms: int | None = None

    @classmethod
    def from_json(cls, raw: bytes | str) -> Message:
        data: dict[str, Any] = json.loads(raw)

        def number(name: str) -> int | None:  # Lua's numbers may come back as floats
            value = data.get(name)
            return None if value is None else int(value)

        return cls(
            id=str(data["id"]),
            event=str(data["event"]),
            attempts=number("attempts") or 0,
            created_ms=number("created_ms") or 0,
            skips=number("skips") or 0,
            last_attempt_ms=number("last_attempt_ms"),
            last_status=number("last_status"),
            last_error=data.get("last_error"),
            next_ms=number("next_ms"),
            delivered_ms=number("delivered_ms"),
            gave_up_ms=number("gave_up_ms"),
        )


@dataclass(frozen=True)
class Taken:
    """A message this gateway holds the lease on: the head of its job's outbox."""

    job_id: str
    token: str
    message: Message
    spec: WebhookSpec
    body: bytes | None  # kept from an earlier attempt: every attempt sends the same body
    now_ms: int  # Redis time when it was taken


class Outbox:
    """Take, settle and read the webhook messages of one cluster."""

    def __init__(self, redis: aioredis.Redis, keys: RedisKeys) -> None:
        self._redis = redis
        self._keys = keys
        self._take = register(redis, "webhook_take")
        self._done = register(redis, "webhook_done")
        self._restore = register(redis, "webhook_restore")

    async def take(self, owner: str, count: int, lease_ms: int) -> list[Taken]:
        """Up to `count` due messages (one per job), each leased to `owner` for `lease_ms`."""
        reply: list[Any] = await self._take(
            keys=[self._keys.webhooks_due], args=[lease_ms, owner, count, self._keys.webhook("")]
        )
        now_ms = int(reply[0])
        taken = []
        for job_id, token, state, spec, body in reply[1:]:
            parsed = WebhookSpec.from_json(spec)
            message = Message.from_json(state)
            if parsed is None:  # nothing to send it to: give it up rather than take it for ever
                parsed = WebhookSpec(url="")
            taken.append(Taken(text(job_id), text(token), message, parsed, body or None, now_ms))
        return taken

    async def done(
        self, taken: Taken, outcome: Outcome, status: int | None, error: str, retry_ms: int, keep_s: int, body: bytes
    ) -> str:
        """Record an attempt of `taken`: `stale` when its lease was lost (another gateway holds the message)."""
        args = [taken.token, taken.job_id, outcome, status if status is not None else "", error[:300], retry_ms]
        reply = await self._done(
            keys=[self._keys.webhooks_due, self._keys.webhook(taken.job_id)],
            args=[*args, keep_s, body if taken.body is None else ""],
        )
        return text(reply)

    async def restore(self, job_id: str, spec: WebhookSpec) -> bool:
        """Give a job's record back its webhook if Redis lost it (an ended job's `completed` falls due);
        True when it was missing."""
        keys = [self._keys.job(job_id), self._keys.webhooks_due, self._keys.webhook(job_id)]
        return bool(await self._restore(keys=keys, args=[job_id, spec.to_json()]))

    async def messages(self, job_id: str) -> list[Message]:
        """A job's webhook messages, oldest first (none before its first event)."""
        fields: dict[bytes, bytes] = await self._redis.hgetall(self._keys.webhook(job_id))  # type: ignore[assignment]
        messages = [Message.from_json(v) for k, v in fields.items() if k.startswith(b"m:")]
        return sorted(messages, key=lambda m: int(m.id.rpartition("_")[2]))

    async def depth(self) -> int:
        """Jobs with a message due, leased or waiting for a retry: the outbox's depth."""
        return int(await self._redis.zcard(self._keys.webhooks_due))

    async def wait_ms(self) -> int | None:
        """Milliseconds until the earliest message is due (0: now); None when none is."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zrange(self._keys.webhooks_due, 0, 0, withscores=True)
            pipe.time()
            first, (seconds, micros) = await pipe.execute()
        if not first:
            return None
        due_ms, now_ms = int(first[0][1]), int(seconds) * 1000 + int(micros) // 1000
        return max(0, due_ms - now_ms)
