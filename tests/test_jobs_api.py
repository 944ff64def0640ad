"""The job API over real HTTP and a real redis-server: submit, status, cancel, images, idempotency, events.

A test plays the worker through the queue (claim, start, progress, complete), so every state is reached
on purpose, in order.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, cast

import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient
from redis.exceptions import ConnectionError as RedisConnectionError

from common.jobstore import JobStore, Submitter
from common.protocol import Job
from common.rediskeys import RedisKeys
from common.streams import JobStreams
from gateway.auth import Caller
from gateway.positions import PositionBoard
from gateway.schemas import GenerateRequest
from gateway.state import JOURNAL
from tests.queues import Queue
from tests.support import (
    OLD_FINGERPRINT,
    OLD_REQUEST,
    TEST_SHAPES,
    claim_next,
    finish,
    queued_jobs,
    read_events,
    register_worker,
    worker_streams,
)
from worker.delivery import ClaimedJob, Delivery

KEYS = RedisKeys()
Client = TestClient[Any, Any]


async def submit(client: Client, headers: dict[str, str] | None = None, **body: Any) -> dict[str, Any]:
    response = await client.post("/v1/jobs", json={"prompt": "a lighthouse", **body}, headers=headers)
    assert response.status == 202, await response.text()
    payload: dict[str, Any] = await response.json()
    assert response.headers["Location"] == payload["status_url"]
    return payload


async def state(client: Client, job_id: str) -> dict[str, Any]:
    response = await client.get(f"/v1/jobs/{job_id}")
    assert response.status == 200
    payload: dict[str, Any] = await response.json()
    return payload


async def start(redis_client: aioredis.Redis, worker: str = "test-worker") -> ClaimedJob:
    claimed = await claim_next(redis_client, worker)
    assert await Delivery(redis_client, KEYS).start(claimed, worker) is not None
    return claimed


async def test_submit_answers_202_with_where_to_follow_the_job(client: Client, fake_worker: None) -> None:
    accepted = await submit(client, seed=1)
    job_id = accepted["id"]
    assert accepted == {
        "id": job_id,
        "status": "queued",
        "status_url": f"/v1/jobs/{job_id}",
        "events_url": f"/v1/jobs/{job_id}/events",
    }
    assert await state(client, job_id) == {"id": job_id, "status": "queued", "queue_position": 0}


async def test_queue_positions_move_as_jobs_are_taken(
    client: Client, redis_client: aioredis.Redis, fake_worker: None
) -> None:
    ids = [(await submit(client, seed=k))["id"] for k in range(3)]
    assert [(await state(client, i))["queue_position"] for i in ids] == [0, 1, 2]
    await start(redis_client)
    first = await state(client, ids[0])
    assert (first["status"], first["worker"]) == ("running", "test-worker") and "queue_position" not in first
    assert [(await state(client, i))["queue_position"] for i in ids[1:]] == [0, 1]


async def test_running_job_reports_progress_then_its_result_as_image_urls(
    client: Client, redis_client: aioredis.Redis, fake_worker: None
) -> None:
    job_id = (await submit(client, num_inference_steps=3, output_format="jpeg", quality=80))["id"]
    claimed = await start(redis_client)
    assert (claimed.job.output_format, claimed.job.quality) == ("jpeg", 80)
    await Delivery(redis_client, KEYS).progress(job_id, "test-worker", 2, 3)
    assert (await state(client, job_id))["progress"] == {"step": 2, "total": 3}
    await finish(redis_client, claimed, [b"jpeg-0", b"jpeg-1"], media_type="image/jpeg")
    done = await state(client, job_id)
    assert done["status"] == "succeeded" and "progress" not in done
    result = done["result"]
    assert result["images"] == [f"/v1/jobs/{job_id}/images/0", f"/v1/jobs/{job_id}/images/1"]
    assert result["media_type"] == "image/jpeg" and result["num_inference_steps"] == 3
    image = await client.get(result["images"][1])
    assert (image.status, image.content_type, await image.read()) == (200, "image/jpeg", b"jpeg-1")
    assert image.headers["Content-Disposition"] == f'inline; filename="{job_id}-1.jpg"'


async def test_image_errors(client: Client, redis_client: aioredis.Redis, fake_worker: None) -> None:
    job_id = (await submit(client))["id"]
    not_yet = await client.get(f"/v1/jobs/{job_id}/images/0")
    assert not_yet.status == 409 and (await not_yet.json())["error"]["code"] == "not_finished"
    await finish(redis_client, await claim_next(redis_client), [b"png"])
    for path, status in (
        (f"/v1/jobs/{job_id}/images/1", 404),
        (f"/v1/jobs/{job_id}/images/x", 404),
        ("/v1/jobs/nope/images/0", 404),
    ):
        response = await client.get(path)
        assert response.status == status and (await response.json())["error"]["field"] in ("index", "job_id")


async def test_cancel_a_queued_job_and_it_never_runs(
    client: Client, redis_client: aioredis.Redis, fake_worker: None
) -> None:
    job_id = (await submit(client))["id"]
    response = await client.delete(f"/v1/jobs/{job_id}")
    assert response.status == 200 and (await response.json())["status"] == "cancelled"
    assert await queued_jobs(redis_client) == 0  # off the stream: no worker is handed it
    assert await Delivery(redis_client, KEYS).claim("test-worker", worker_streams(), block_ms=10) is None
    assert (await state(client, job_id))["status"] == "cancelled"
    again = await client.delete(f"/v1/jobs/{job_id}")
    assert again.status == 200  # cancelling twice is harmless


async def test_a_job_cancelled_after_delivery_is_skipped_by_its_worker(
    client: Client, redis_client: aioredis.Redis, fake_worker: None
) -> None:
    job_id = (await submit(client))["id"]
    claimed = await claim_next(redis_client)  # delivered, but the worker has not started it yet
    assert (await client.delete(f"/v1/jobs/{job_id}")).status == 200
    queue = Queue.of(redis_client, KEYS)
    assert await queue.delivery.start(claimed, "test-worker") is None
    await queue.delivery.discard(claimed)
    assert (await redis_client.xpending(claimed.stream, KEYS.workers_group))["pending"] == 0
    assert await redis_client.lrange(KEYS.attempts(job_id), 0, -1) == []  # it never ran


async def test_cancel_a_running_job_discards_its_result(
    client: Client, redis_client: aioredis.Redis, fake_worker: None
) -> None:
    job_id = (await submit(client))["id"]
    claimed = await start(redis_client)
    assert (await client.delete(f"/v1/jobs/{job_id}")).status == 200
    queue = Queue.of(redis_client, KEYS)
    assert await queue.delivery.progress(job_id, "test-worker", 1, 2) == "cancelled"  # the worker learns of it
    assert await finish(redis_client, claimed, [b"late"]) is False
    assert (await state(client, job_id))["status"] == "cancelled"
    assert (await queue.streams.counters())["discarded_after_cancel"] == 1
    assert (await client.get(f"/v1/jobs/{job_id}/images/0")).status == 409


async def test_cancel_of_a_finished_or_unknown_job(
    client: Client, redis_client: aioredis.Redis, fake_worker: None
) -> None:
    job_id = (await submit(client))["id"]
    await finish(redis_client, await claim_next(redis_client), [b"png"])
    response = await client.delete(f"/v1/jobs/{job_id}")
    assert response.status == 409
    body = await response.json()
    assert body["error"]["code"] == "already_finished" and body["job_status"] == "succeeded"
    assert (await client.delete("/v1/jobs/nope")).status == 404


async def test_idempotency_key_gives_the_same_job(
    client: Client, redis_client: aioredis.Redis, fake_worker: None
) -> None:
    key = {"Idempotency-Key": "order-42"}
    first = await submit(client, headers=key)
    response = await client.post("/v1/jobs", json={"prompt": "a lighthouse"}, headers=key)
    assert response.status == 202 and response.headers["Idempotent-Replayed"] == "true"
    assert (await response.json())["id"] == first["id"]
    assert await queued_jobs(redis_client) == 1
    other = await client.post("/v1/jobs", json={"prompt": "another"}, headers=key)
    assert other.status == 422
    error = (await other.json())["error"]
    assert (error["code"], error["field"]) == ("idempotency_key_reused", "Idempotency-Key")
    bad = await client.post("/v1/jobs", json={"prompt": "a"}, headers={"Idempotency-Key": "x" * 256})
    assert bad.status == 400 and (await bad.json())["error"]["field"] == "Idempotency-Key"


async def test_generate_replayed_after_the_job_finished_answers_at_once(
    client: Client, redis_client: aioredis.Redis, fake_worker: None
) -> None:
    key = {"Idempotency-Key": "sync-1"}
    worker = asyncio.create_task(claim_next(redis_client))
    first = await client.post("/v1/generate", json={"prompt": "a"}, headers=key)
    assert first.status == 504  # nobody finished it in time; the test finishes it now
    await finish(redis_client, await worker, [b"png"])
    replay = await client.post("/v1/generate", json={"prompt": "a"}, headers=key)
    assert replay.status == 200
    assert (await replay.json())["id"] == (await first.json())["id"]


async def test_format_rules(client: Client, redis_client: aioredis.Redis, fake_worker: None) -> None:
    for body, field in (
        ({"output_format": "gif"}, "output_format"),
        ({"quality": 50}, "quality"),
        ({"output_format": "webp", "quality": 101}, "quality"),
    ):
        response = await client.post("/v1/jobs", json={"prompt": "a", **body})
        assert response.status == 400 and (await response.json())["error"]["field"] == field
    assert await queued_jobs(redis_client) == 0


async def test_unknown_job_status_and_events_are_404(client: Client) -> None:
    for path in ("/v1/jobs/nope", "/v1/jobs/nope/events"):
        response = await client.get(path)
        assert response.status == 404 and (await response.json())["error"]["code"] == "unknown_job"


# --- Server-sent events


async def test_events_follow_a_job_through_every_step(
    client: Client, redis_client: aioredis.Redis, fake_worker: None
) -> None:
    job_id = (await submit(client, num_inference_steps=3))["id"]
    response = await client.get(f"/v1/jobs/{job_id}/events")
    assert response.status == 200 and response.content_type == "text/event-stream"
    events = read_events(response)
    assert await anext(events) == ("queued", {"id": job_id, "position": 0})
    claimed = await start(redis_client)
    assert await anext(events) == ("started", {"id": job_id, "worker": "test-worker"})
    queue = Queue.of(redis_client, KEYS)
    await queue.delivery.progress(job_id, "test-worker", 1, 3)
    assert await anext(events) == ("progress", {"id": job_id, "step": 1, "total": 3})
    await queue.delivery.progress(job_id, "test-worker", 3, 3)  # step 2's message was coalesced away
    assert [await anext(events) for _ in range(2)] == [
        ("progress", {"id": job_id, "step": s, "total": 3}) for s in (2, 3)
    ]
    await finish(redis_client, claimed, [b"a", b"b"])
    name, data = await anext(events)
    assert name == "succeeded" and data["result"]["images"][1] == f"/v1/jobs/{job_id}/images/1"
    assert [event async for event in events] == []  # the stream ends after the final event


async def test_events_of_a_cancelled_job(client: Client, fake_worker: None) -> None:
    job_id = (await submit(client))["id"]
    response = await client.get(f"/v1/jobs/{job_id}/events")
    events = read_events(response)
    assert (await anext(events))[0] == "queued"
    await client.delete(f"/v1/jobs/{job_id}")
    assert [event async for event in events] == [("cancelled", {"id": job_id})]


async def test_events_of_a_finished_job_are_just_its_outcome(
    client: Client, redis_client: aioredis.Redis, fake_worker: None
) -> None:
    job_id = (await submit(client))["id"]
    await finish(redis_client, await claim_next(redis_client), [b"png"])
    response = await client.get(f"/v1/jobs/{job_id}/events")
    assert [name async for name, _ in read_events(response)] == ["succeeded"]


async def test_queued_position_updates_as_the_queue_moves(
    client: Client, redis_client: aioredis.Redis, fake_worker: None
) -> None:
    await submit(client, seed=1)
    job_id = (await submit(client, seed=2))["id"]
    response = await client.get(f"/v1/jobs/{job_id}/events")
    events = read_events(response)
    assert await anext(events) == ("queued", {"id": job_id, "position": 1})
    await start(redis_client)  # the job ahead is taken
    assert await anext(events) == ("queued", {"id": job_id, "position": 0})
    response.close()  # the client leaves; the server's stream must not outlive the test's app


async def test_a_job_redis_lost_is_queued_again_by_the_gateway_that_accepted_it(
    client: Client, redis_client: aioredis.Redis, fake_worker: None
) -> None:
    job_id = (await submit(client, {"Idempotency-Key": "lost-1"}))["id"]
    record = await Queue.of(redis_client, KEYS).jobs.record(job_id)
    assert record is not None and record.stream is not None
    # Redis comes back from a snapshot taken before the submit: the job and its entry are gone (and its key,
    # or not: a key naming this very job does not stop it being queued again).
    await redis_client.delete(KEYS.job(job_id), record.stream)
    assert (await client.get(f"/v1/jobs/{job_id}")).status == 404
    journal = client.app[JOURNAL]
    await journal.sweep()
    assert (await state(client, job_id))["status"] == "queued" and journal.resubmitted == 1
    await finish(redis_client, await claim_next(redis_client), [b"png"])
    await journal.sweep()
    assert (await state(client, job_id))["status"] == "succeeded" and len(journal) == 0
    again = await client.post("/v1/jobs", json={"prompt": "a lighthouse"}, headers={"Idempotency-Key": "lost-1"})
    assert (await again.json())["id"] == job_id


async def test_the_journal_never_queues_again_a_job_whose_record_may_have_expired(
    client: Client, redis_client: aioredis.Redis, fake_worker: None
) -> None:
    journal = client.app[JOURNAL]
    job_id = (await submit(client))["id"]
    await redis_client.delete(KEYS.job(job_id))  # gone: lost by Redis, or finished and expired long ago
    (accepted,) = journal._jobs.values()
    journal._jobs[job_id] = dataclasses.replace(accepted, accepted_at=accepted.accepted_at - 3 * 3600 * 60)
    await journal.sweep()
    assert journal.resubmitted == 0 and len(journal) == 0
    assert await redis_client.exists(KEYS.job(job_id)) == 0


async def test_the_scheduler_is_queued_with_the_job_and_shown_in_its_result(
    client: Client, redis_client: aioredis.Redis
) -> None:
    await register_worker(redis_client, schedulers=["euler", "dpmpp_2m_karras"])
    job_id = (await submit(client, scheduler="dpmpp_2m_karras"))["id"]
    claimed = await start(redis_client)
    assert claimed.job.params.scheduler == "dpmpp_2m_karras"
    await finish(redis_client, claimed, [b"png"])
    assert (await state(client, job_id))["result"]["scheduler"] == "dpmpp_2m_karras"
    default = (await submit(client))["id"]
    assert (await claim_next(redis_client)).job.params.scheduler == "euler"
    assert default != job_id


async def test_every_submit_route_says_when_it_replayed_an_idempotency_key(
    client: Client, redis_client: aioredis.Redis
) -> None:
    await register_worker(redis_client, worker_id="test-worker")
    routes = {"/v1/jobs": 202, "/v1/generate": 200, "/v1/images/generations": 200}
    for n, (route, status) in enumerate(routes.items()):
        request: dict[str, Any] = {"json": {"prompt": "a lighthouse"}, "headers": {"Idempotency-Key": f"k{n}"}}
        answer = asyncio.create_task(client.post(route, **request))
        await finish(redis_client, await claim_next(redis_client), [b"png"])
        first = await answer
        replay = await client.post(route, **request)  # nobody plays the worker now: a new job would time out
        assert (first.status, replay.status) == (status, status), route
        assert "Idempotent-Replayed" not in first.headers and replay.headers["Idempotent-Replayed"] == "true", route


async def test_a_webhook_given_as_a_url_string_is_400_naming_webhook(
    client: Client, redis_client: aioredis.Redis
) -> None:
    await register_worker(redis_client, worker_id="test-worker")
    for route in ("/v1/jobs", "/v1/generate"):
        response = await client.post(route, json={"prompt": "a lighthouse", "webhook": "https://example.com/hook"})
        error = (await response.json())["error"]
        assert (response.status, error["field"], error["code"]) == (400, "webhook", "model_type"), route
        assert "takes an object with url" in error["message"], route
    assert await queued_jobs(redis_client) == 0


class _CancelTurnedIntoConnectionError:
    """Stream positions as redis-py answers them when a cancellation lands inside the command: the
    cancellation comes out as a connection error."""

    def __init__(self) -> None:
        self.asked = asyncio.Event()

    async def positions(self, stream: str, entry_ids: list[str]) -> dict[str, int]:
        self.asked.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise RedisConnectionError("Connection closed by server.") from None
        return {}


async def test_the_position_board_stops_when_a_cancellation_comes_out_as_a_connection_error() -> None:
    streams = _CancelTurnedIntoConnectionError()
    board = PositionBoard(cast("JobStreams", streams), interval_s=0.01)
    board.track(("sdxl:jobs:64x64", "1-0"))
    running = asyncio.create_task(board.run())
    await streams.asked.wait()
    board.stop()  # as the app's cleanup does, before it cancels
    running.cancel()
    done, _ = await asyncio.wait({running}, timeout=10)
    assert done == {running}


async def test_n_is_queued_with_the_job_default_four_and_at_most_the_workers_images_per_request(
    client: Client, redis_client: aioredis.Redis, fake_worker: None
) -> None:
    named: list[tuple[dict[str, Any], int]] = [({"n": 1}, 1), ({}, 4)]  # omitted: 4, as the demo page makes
    for body, made in named:
        await submit(client, **body)
        claimed = await claim_next(redis_client)
        assert claimed.job.params.n == made
        await finish(redis_client, claimed, [b"png"] * made)
    refused: list[tuple[Any, str]] = [(5, "less_than_equal"), (0, "greater_than_equal"), ("2", "int_type")]
    for n, code in refused:
        response = await client.post("/v1/jobs", json={"prompt": "a", "n": n})
        error = (await response.json())["error"]
        assert (response.status, error["field"], error["code"]) == (400, "n", code), n
    assert await queued_jobs(redis_client) == 0  # nothing refused was queued


async def test_n_may_reach_what_every_able_worker_makes_per_request(
    client: Client, redis_client: aioredis.Redis
) -> None:
    await register_worker(redis_client, worker_id="big", images_per_request=8)
    await submit(client, n=8)
    await register_worker(redis_client, worker_id="small", images_per_request=4)  # may claim from the same stream
    response = await client.post("/v1/jobs", json={"prompt": "a", "n": 8})
    assert response.status == 400 and "4" in (await response.json())["error"]["message"]


async def test_a_key_stored_before_requests_had_n_still_matches_its_retry(
    client: Client, redis_client: aioredis.Redis, fake_worker: None
) -> None:
    params = GenerateRequest.model_validate(OLD_REQUEST).resolved(TEST_SHAPES[0], seed=7)
    old = Job(id="before-n", params=params, result_ttl_s=60)
    caller = Submitter(scope=Caller("address", "127.0.0.1").scope)  # the test client, as the gateway sees it
    stream = KEYS.size_stream(TEST_SHAPES[0].size)
    await JobStore(redis_client, KEYS).submit(old, stream, "old-key", OLD_FINGERPRINT, submitter=caller)
    retry = await client.post("/v1/jobs", json=OLD_REQUEST, headers={"Idempotency-Key": "old-key"})
    assert retry.status == 202 and retry.headers["Idempotent-Replayed"] == "true"
    assert (await retry.json())["id"] == "before-n"
    named = await client.post("/v1/jobs", json={**OLD_REQUEST, "n": 2}, headers={"Idempotency-Key": "old-key"})
    assert named.status == 422  # another request now: two images, not the default four
