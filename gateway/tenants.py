"""Tenants: one caller can neither see, cancel nor starve another's jobs.

While keys are configured, each caller (an API key, or an address for a caller without one under
`--public-demo`) is a tenant:

- its `Idempotency-Key`s are its own (common/rediskeys.py scopes them by caller);
- a job records its owner, and any other tenant is told such a job does not exist: the same 404 as an
  unknown id (`visible_job_id`). A key marked `admin` sees every job; a job made without a key is
  reachable by its unguessable id alone, as the demo page needs;
- fair share: at most `--max-jobs-in-flight-per-caller` of its jobs queued or running (checked inside the
  submit script, common/lua/submit.lua, so replicas cannot overshoot it) and at most
  `--max-event-streams-per-caller` open event streams per gateway (`EventStreams`), which end when the
  caller's key is revoked, and at most `--max-waiting-requests-per-caller` requests waiting for a result
  per gateway (`Waiters`): a replay of an `Idempotency-Key` creates no job, so only this counts it.

Without keys configured the cluster is one tenant: no owner checks and no per-caller caps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Iterator

from aiohttp import web

from common.jobstore import TooManyInFlight
from gateway.auth import CALLER, Caller
from gateway.errors import ApiError
from gateway.limits import MAX_RETRY_AFTER_S, QUEUE_FULL_RETRY_S, ThroughputMeter
from gateway.listener import JobEvent

logger = logging.getLogger(__name__)

# Why an open event stream was ended by the gateway (the data of its last event, `closed`).
KEY_REVOKED = "api_key_revoked"
CLOSED_EVENT = JobEvent(type="closed")
# Streams end when their jobs do; a refused one may be tried again after this.
STREAM_RETRY_AFTER_S = 5
WAIT_RETRY_AFTER_S = 5  # and so do waiting requests


def caller_of(request: web.Request) -> Caller | None:
    """The caller the protection middleware identified (None on a route it does not protect)."""
    return request.get(CALLER)


def too_many_in_flight(exc: TooManyInFlight, meter: ThroughputMeter) -> ApiError:
    """429 for a caller at its cap, with the seconds until a completion is likely (1..60)."""
    rate = meter.per_second()
    retry = min(max(math.ceil(1 / rate), 1), MAX_RETRY_AFTER_S) if rate > 0 else QUEUE_FULL_RETRY_S
    return ApiError(
        429,
        "too_many_jobs_in_flight",
        f"this caller already has {exc.held} jobs queued or running (at most {exc.cap} jobs in flight per "
        f"caller); retry in {retry} s, or once one of them has finished",
        headers={"Retry-After": str(retry)},
    )


class StreamTicket:
    """One open event stream: whose it is, and why the gateway ended it (None while it may go on)."""

    def __init__(self, caller: Caller | None, events: asyncio.Queue[JobEvent]) -> None:
        self.caller = caller
        self.reason: str | None = None
        self._events = events

    def end(self, reason: str) -> None:
        """Ask the stream to send a last `closed` event with `reason` and end; wakes it at once."""
        self.reason = reason
        if self._events.full():  # a stalled reader: make room, it checks `reason` before anything else
            self._events.get_nowait()
        self._events.put_nowait(CLOSED_EVENT)


class EventStreams:
    """The event streams open on this gateway, by caller: capped per tenant, ended when a key is revoked."""

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._open: dict[str, set[StreamTicket]] = {}

    @contextlib.contextmanager
    def open(self, caller: Caller | None, events: asyncio.Queue[JobEvent]) -> Iterator[StreamTicket]:
        """Hold a place for one stream for the duration; 429 when the caller already holds its cap."""
        ticket = StreamTicket(caller, events)
        if caller is None or not caller.tenant:
            yield ticket
            return
        held = self._open.setdefault(caller.scope, set())
        if self._cap and len(held) >= self._cap:
            raise ApiError(
                429,
                "too_many_event_streams",
                f"this caller already has {len(held)} open event streams (at most {self._cap} open event "
                "streams per caller); close one, or poll the job's status_url",
                headers={"Retry-After": str(STREAM_RETRY_AFTER_S)},
            )
        held.add(ticket)
        try:
            yield ticket
        finally:
            held.discard(ticket)
            if not held:
                del self._open[caller.scope]

    def end_unless(self, accepts: Callable[[Caller], bool], reason: str = KEY_REVOKED) -> int:
        """End every open stream whose caller is no longer accepted; returns how many."""
        ended = 0
        for tickets in self._open.values():
            for ticket in tickets:
                if ticket.caller is not None and ticket.reason is None and not accepts(ticket.caller):
                    ticket.end(reason)
                    ended += 1
        if ended:
            logger.info("ended %d event streams: %s", ended, reason)
        return ended


class Waiters:
    """The requests waiting for a job's result on this gateway (`/v1/generate`, `/v1/images/generations`), by
    caller: capped per tenant, replays of an `Idempotency-Key` included."""

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._held: dict[str, int] = {}

    @contextlib.contextmanager
    def hold(self, caller: Caller | None) -> Iterator[None]:
        """Hold a place for one waiting request for the duration; 429 when the caller already holds its cap."""
        if caller is None or not caller.tenant or not self._cap:
            yield
            return
        scope = caller.scope
        held = self._held.get(scope, 0)
        if held >= self._cap:
            raise ApiError(
                429,
                "too_many_waiting_requests",
                f"this caller already has {held} requests waiting for their results on this gateway (at most "
                f"{self._cap} waiting requests per caller, Idempotency-Key replays included); retry in "
                f"{WAIT_RETRY_AFTER_S} s, or submit with POST /v1/jobs and follow the job",
                headers={"Retry-After": str(WAIT_RETRY_AFTER_S)},
            )
        self._held[scope] = held + 1
        try:
            yield
        finally:
            self._held[scope] -= 1
            if not self._held[scope]:
                del self._held[scope]
