"""`sdxl-serve status` against a real redis-server: the registry, streams, pending and dead letters."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio as aioredis

from common.rediskeys import RedisKeys
from sdxl_serve.cli import main
from testkit import free_port
from testkit.jobs import make_job
from tests.queues import Queue
from tests.support import TEST_SHAPES, RedisServer, claim_next, register_worker

KEYS = RedisKeys()


async def test_status_reports_workers_queue_pending_and_dead_letters(
    redis_server: RedisServer, redis_client: aioredis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    await register_worker(redis_client, "w1", rows=16, free_rows=13)
    await register_worker(redis_client, "w2", state="warming")
    queue = Queue.of(redis_client, KEYS)
    shared = KEYS.size_stream(TEST_SHAPES[0].size)
    for k in range(3):
        await queue.jobs.submit(make_job(f"j{k}"), shared)
    claimed = await claim_next(redis_client)  # one in service
    await queue.delivery.dead_letter(claimed, "test-worker", "for the test")
    await queue.jobs.submit(make_job("late"), shared)

    # The command runs its own event loop, as it does from a shell.
    assert await asyncio.to_thread(main, ["status", "--redis-url", redis_server.url(0), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert [(w["id"], w["state"]) for w in status["workers"]] == [("w1", "ready"), ("w2", "warming")]
    assert (status["queue_depth"], status["pending"], status["dead_letter"]) == (3, 0, 1)
    assert {s["stream"]: s["length"] for s in status["streams"]}[shared] == 3
    assert status["counters"]["dead_lettered"] == 1

    await claim_next(redis_client)
    assert await asyncio.to_thread(main, ["status", "--redis-url", redis_server.url(0)]) == 0
    table = capsys.readouterr().out
    header, w1 = table.splitlines()[:2]
    assert header.split() == [
        "WORKER", "HOST", "DEVICES", "SIZES", "STEPS", "SCHEDULERS", "STATE", "ROWS", "JOBS", "HEARTBEAT"
    ]  # fmt: skip
    assert w1.split()[:10] == ["w1", "h", "0", "x", "unknown", "64x64", "1..3", "euler", "ready", "3/16"]
    assert "warming" in table
    assert "queue depth 3 (of which in service or held: 1), dead letters 1" in table


def test_status_says_when_redis_is_unreachable(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--redis-url", f"redis://127.0.0.1:{free_port()}/0"]) == 1
    assert "cannot reach Redis" in capsys.readouterr().err


async def test_status_shows_what_a_warming_worker_does(
    redis_server: RedisServer, redis_client: aioredis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    await register_worker(redis_client, "w1", state="warming", phase="compiling and warming 1216x832 (3/9)")
    assert await asyncio.to_thread(main, ["status", "--redis-url", redis_server.url(0)]) == 0
    assert "warming: compiling and warming 1216x832 (3/9)" in capsys.readouterr().out
