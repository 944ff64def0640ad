"""`GET /v1/jobs/{id}/events`: a job's life as server-sent events.

`queued` (position, again whenever it changes), `started` (worker), `progress` for every denoising step in
order, then one of `succeeded`, `failed` or `cancelled`, after which the stream ends.

The stream is driven by the job's state, not by the messages alone: the handler subscribes first, then
reads the stored state, and from then on applies each event; whenever delivery may have had a gap (the
listener resubscribed, a slow reader overflowed) it re-reads the state. Steps between the last one sent
and the current one are filled in, so a client sees every step once even when pub/sub dropped a message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from aiohttp import web
from aiohttp_sse import EventSourceResponse, sse_response
from pydantic import BaseModel

from common.jobstore import JobRecord
from common.protocol import FINISHED
from common.redis_conn import UNAVAILABLE
from gateway import jobs
from gateway.listener import JobEvent
from gateway.positions import Entry
from gateway.schemas import (
    CancelledEvent,
    ClosedEvent,
    ErrorDetail,
    FailedEvent,
    JobState,
    ProgressEvent,
    QueuedEvent,
    StartedEvent,
    SucceededEvent,
)
from gateway.state import EVENT_STREAMS, LISTENER, POSITIONS
from gateway.tenants import StreamTicket, caller_of

logger = logging.getLogger(__name__)

# Re-read the whole state this often even when no event says it changed: a backstop, it costs little.
RESYNC_INTERVAL_S = 15.0
# How often a queued job's position is looked at (the board refreshes it in the background).
POSITION_INTERVAL_S = 1.0
PING_INTERVAL_S = 15.0


@dataclass
class _Sent:
    """What the client has been told so far."""

    position: int | None = None
    worker: str | None = None
    step: int = 0


async def job_events(request: web.Request) -> web.StreamResponse:
    """Stream a job's events until it finishes, the client goes away, or the caller's key is revoked."""
    job_id = await jobs.visible_job_id(request)
    listener = request.app[LISTENER]
    events = listener.watch(job_id)  # before reading the state: nothing falls between the two
    try:
        with request.app[EVENT_STREAMS].open(caller_of(request), events) as ticket:
            found = await jobs.read_state(request.app, job_id)
            if found is None:
                raise jobs.unknown_job(job_id)
            async with sse_response(request, ping_interval=PING_INTERVAL_S) as sse:
                await _JobStream(request.app, sse, job_id, ticket).run(*found, events)
            return sse
    finally:
        listener.unwatch(job_id, events)


class _JobStream:
    def __init__(self, app: web.Application, sse: EventSourceResponse, job_id: str, ticket: StreamTicket) -> None:
        self._app = app
        self._sse = sse
        self._id = job_id
        self._ticket = ticket
        self._sent = _Sent()
        self._entry: Entry | None = None

    async def run(self, state: JobState, record: JobRecord | None, events: asyncio.Queue[JobEvent]) -> None:
        try:
            await self._follow(state, record, events)
        finally:
            self._track(None)

    async def _follow(self, state: JobState, record: JobRecord | None, events: asyncio.Queue[JobEvent]) -> None:
        loop = asyncio.get_running_loop()
        resync_at = loop.time() + RESYNC_INTERVAL_S
        while True:
            if self._ticket.reason is not None:  # ended by the gateway (the key was revoked): say why
                await self._send([("closed", ClosedEvent(id=self._id, reason=self._ticket.reason))])
                return
            self._track(_entry_of(record) if state.status == "queued" else None)
            await self._send(_changes(self._sent, state))
            if state.status in FINISHED or not self._sse.is_connected():
                return
            event = await _next(events, POSITION_INTERVAL_S if state.status == "queued" else RESYNC_INTERVAL_S)
            if event is not None and event.type == "closed":
                continue
            if event is not None and event.type in ("started", "progress"):
                state = _apply(state, event)
            elif event is None and state.status == "queued" and loop.time() < resync_at:
                state = self._with_board_position(state)
            else:  # finished, resync, or the periodic backstop
                state, record = await self._reread(state, record)
                resync_at = loop.time() + RESYNC_INTERVAL_S

    async def _reread(self, state: JobState, record: JobRecord | None) -> tuple[JobState, JobRecord | None]:
        try:
            found = await jobs.read_state(self._app, self._id)
        except UNAVAILABLE as exc:  # keep the stream; the listener resyncs us once Redis is back
            logger.warning("job %s events: state not readable (%s)", self._id, exc)
            return state, record
        if found is None:  # expired while followed: nothing more will happen to it
            return JobState(
                id=self._id, status="failed", error=ErrorDetail(code="expired", message="the job's record expired")
            ), None
        return found

    def _with_board_position(self, state: JobState) -> JobState:
        position = self._app[POSITIONS].position(self._entry) if self._entry else None
        return state if position is None else state.model_copy(update={"queue_position": position})

    def _track(self, entry: Entry | None) -> None:
        if entry == self._entry:
            return
        board = self._app[POSITIONS]
        if self._entry is not None:
            board.untrack(self._entry)
        if entry is not None:
            board.track(entry)
        self._entry = entry

    async def _send(self, changes: list[tuple[str, BaseModel]]) -> None:
        for name, payload in changes:
            # A client that went away (reset) or stopped reading (send timeout): the stream ends.
            with contextlib.suppress(ConnectionResetError, TimeoutError):
                await self._sse.send(payload.model_dump_json(), event=name)


def _entry_of(record: JobRecord | None) -> Entry | None:
    if record is None or record.stream is None or record.entry_id is None:
        return None
    return record.stream, record.entry_id


async def _next(events: asyncio.Queue[JobEvent], wait_s: float) -> JobEvent | None:
    try:
        async with asyncio.timeout(wait_s):
            return await events.get()
    except TimeoutError:
        return None


def _apply(state: JobState, event: JobEvent) -> JobState:
    """A live event applied to the state without a round trip to Redis."""
    update: dict[str, object] = {"status": "running", "queue_position": None}
    if event.type == "started":
        update.update(worker=event.worker, progress=None)
    elif event.step is not None and event.total is not None:
        update["progress"] = {"step": event.step, "total": event.total}
    return JobState.model_validate(state.model_dump() | update)


def _changes(sent: _Sent, state: JobState) -> list[tuple[str, BaseModel]]:
    """The events that bring a client told `sent` up to `state`; updates `sent`."""
    out: list[tuple[str, BaseModel]] = []
    job_id = state.id
    if state.status == "queued":
        if state.queue_position is not None and state.queue_position != sent.position:
            sent.position = state.queue_position
            out.append(("queued", QueuedEvent(id=job_id, position=state.queue_position)))
        return out
    if state.worker is not None and state.worker != sent.worker and state.status == "running":
        sent.worker, sent.step = state.worker, 0  # a takeover starts the steps again
        out.append(("started", StartedEvent(id=job_id, worker=state.worker)))
    progress = state.progress
    if state.status == "succeeded" and state.result is not None and sent.worker is not None:
        total = state.result.num_inference_steps  # finished while we watched: complete the bar
        out += _steps(job_id, sent, total, total)
    elif progress is not None:
        out += _steps(job_id, sent, progress.step, progress.total)
    if state.status == "succeeded" and state.result is not None:
        out.append(("succeeded", SucceededEvent(id=job_id, result=state.result)))
    elif state.status == "failed" and state.error is not None:
        out.append(("failed", FailedEvent(id=job_id, error=state.error)))
    elif state.status == "cancelled":
        out.append(("cancelled", CancelledEvent(id=job_id)))
    return out


def _steps(job_id: str, sent: _Sent, step: int, total: int) -> list[tuple[str, BaseModel]]:
    events: list[tuple[str, BaseModel]] = [
        ("progress", ProgressEvent(id=job_id, step=s, total=total)) for s in range(sent.step + 1, step + 1)
    ]
    sent.step = max(sent.step, step)
    return events
