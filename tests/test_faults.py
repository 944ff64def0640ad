"""Fault injection on real processes: workers killed or stopped mid-job, Redis restarted under load.

Each test here runs against its own cluster (own redis-server with AOF, gateway, two workers with a
2 s heartbeat TTL) so it can break things without disturbing the other tests.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from common.jobstore import JobStore
from common.protocol import JobResult, Shape, Size
from common.rediskeys import RedisKeys
from common.registry import Registry
from common.streams import JobStreams
from gateway.listener import JobListener
from testkit import RedisOptions, RedisProcess, free_port, gateway_args, wait_http, worker_args
from testkit.jobs import make_job
from tests.support import READY_TIMEOUT_S, ProcessGroup, post_generate, read_events, wait_ready

pytestmark = pytest.mark.e2e

SLOW_STEPS = 40  # long enough on this machine to act while a job runs


# AOF on, so queued jobs survive a restart; stream writes announced, so a test can await "all jobs
# accepted" as events.
FAULT_REDIS = RedisOptions(appendonly=True, extra=("--notify-keyspace-events", "Kt"))


@dataclass
class FaultCluster:
    redis: RedisProcess
    processes: ProcessGroup
    model: Path
    url: str
    workers: list[str] = field(default_factory=list)
    _serial: int = 0

    def start_worker(self) -> str:
        self._serial += 1
        name = f"fault-worker-{self._serial}"
        self.processes.start(
            name,
            *worker_args(
                self.redis.url(), self.model, name, "--heartbeat-ttl", "2", "--drain-timeout", "60",
                max_steps=SLOW_STEPS, default_steps=2,
            ),
        )  # fmt: skip
        self.workers.append(name)
        return name

    def alive(self) -> list[str]:
        return [w for w in self.workers if self.processes.processes[w].poll() is None]

    async def top_up(self, count: int = 2) -> None:
        """Start workers until `count` are alive, and wait until they are ready."""
        for _ in range(count - len(self.alive())):
            self.start_worker()
        await wait_ready(self.redis.url(), count)


@pytest.fixture(scope="module")
def fault_cluster(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultCluster]:
    directory = tmp_path_factory.mktemp("fault-redis")
    redis = RedisProcess(directory, FAULT_REDIS)
    redis.start()
    processes = ProcessGroup(tmp_path_factory.mktemp("fault-logs"))
    port = free_port()
    processes.start("fault-gateway", *gateway_args(redis.url(), port, "--request-timeout", "120"))
    cluster = FaultCluster(redis=redis, processes=processes, model=tiny_model, url=f"http://127.0.0.1:{port}")
    asyncio.run(wait_http(f"{cluster.url}/healthz", READY_TIMEOUT_S))
    try:
        yield cluster
    finally:
        processes.stop_all()
        redis.stop()


@pytest.fixture
async def cluster(fault_cluster: FaultCluster) -> AsyncIterator[FaultCluster]:
    await fault_cluster.top_up(2)
    yield fault_cluster


async def next_start(pubsub: aioredis.client.PubSub) -> dict[str, Any]:
    """The next job-started event."""
    async with asyncio.timeout(120):
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=120)
            if message is not None:
                event: dict[str, Any] = json.loads(message["data"])
                if event["type"] == "started":
                    return event


async def job_events(url: str) -> tuple[aioredis.Redis, Any]:
    client = aioredis.Redis.from_url(url)
    pubsub = client.pubsub()
    await pubsub.subscribe(RedisKeys().job_events_channel)
    return client, pubsub


async def test_sigkill_mid_job_is_served_by_another_worker(cluster: FaultCluster) -> None:
    client, pubsub = await job_events(cluster.redis.url())
    try:
        request = asyncio.create_task(post_generate(cluster.url, seed=1, num_inference_steps=SLOW_STEPS))
        victim = (await next_start(pubsub))["worker"]
        cluster.processes.processes[victim].send_signal(signal.SIGKILL)
        payload = await request
        assert payload["worker"] != victim
        attempts = await client.lrange(RedisKeys().attempts(payload["id"]), 0, -1)
        assert [a.decode().split("@")[0] for a in attempts if isinstance(a, bytes)] == [victim, payload["worker"]]
        assert (await JobStreams(client, RedisKeys()).counters()).get("duplicate_results", 0) == 0
    finally:
        await pubsub.aclose()
        await client.aclose()


async def test_random_routing_loses_nothing_when_a_worker_dies_with_jobs_queued(cluster: FaultCluster) -> None:
    """Random routing queues jobs per worker; a dead worker's queue goes back to the others."""
    port = free_port()
    cluster.processes.start("random-gateway", *gateway_args(cluster.redis.url(), port, "--routing", "random"))
    url = f"http://127.0.0.1:{port}"
    await wait_http(f"{url}/healthz", READY_TIMEOUT_S)
    client = aioredis.Redis.from_url(cluster.redis.url())
    try:
        async with aiohttp.ClientSession(base_url=url) as session:
            ids = [await submit_job(session, seed) for seed in range(6)]
            lengths = {w: await client.xlen(RedisKeys().worker_stream(w)) for w in cluster.alive()}
            victim = max(lengths, key=lambda w: lengths[w])
            assert sum(lengths.values()) == 6 and lengths[victim] >= 3  # one in service, two or more queued
            cluster.processes.processes[victim].send_signal(signal.SIGKILL)
            outcomes = await asyncio.gather(*(final_event(session, job_id) for job_id in ids))
        assert [name for name, _ in outcomes] == ["succeeded"] * 6
        assert victim not in {data["result"]["worker"] for _, data in outcomes}
        assert await client.exists(RedisKeys().worker_stream(victim)) == 0
    finally:
        cluster.processes.stop("random-gateway")
        await client.aclose()


async def submit_job(session: aiohttp.ClientSession, seed: int) -> str:
    body = {"prompt": "a lighthouse", "seed": seed, "num_inference_steps": SLOW_STEPS}
    async with session.post("/v1/jobs", json=body) as response:
        assert response.status == 202
        job_id: str = (await response.json())["id"]
        return job_id


async def final_event(session: aiohttp.ClientSession, job_id: str) -> tuple[str, dict[str, Any]]:
    async with session.get(f"/v1/jobs/{job_id}/events") as response:
        events = [event async for event in read_events(response)]
    return events[-1]


async def test_sigterm_busy_worker_finishes_its_job_then_exits_0(cluster: FaultCluster) -> None:
    client, pubsub = await job_events(cluster.redis.url())
    try:
        request = asyncio.create_task(post_generate(cluster.url, seed=2, num_inference_steps=SLOW_STEPS))
        busy = (await next_start(pubsub))["worker"]
        await pubsub.subscribe(RedisKeys().worker_events_channel)  # every heartbeat announces the state
        process = cluster.processes.processes[busy]
        process.send_signal(signal.SIGTERM)
        payload = await request
        assert payload["worker"] == busy
        assert await asyncio.to_thread(process.wait, 60) == 0
        assert busy not in [w.id for w in await Registry(client, RedisKeys()).workers()]
        states = await announced_states(pubsub, busy)
        # Once draining, never announced as serving again, not even after its last job.
        assert "draining" in states
        assert set(states[states.index("draining") :]) == {"draining"}, states
    finally:
        await pubsub.aclose()
        await client.aclose()


async def announced_states(pubsub: aioredis.client.PubSub, worker_id: str) -> list[str]:
    """The states a worker announced, from the messages received (the worker has exited: the channel
    goes quiet)."""
    states = []
    while (message := await pubsub.get_message(timeout=0.5)) is not None:
        if message["type"] == "message" and message["channel"].decode() == RedisKeys().worker_events_channel:
            info = json.loads(message["data"])
            if info["id"] == worker_id:
                states.append(info["state"])
    return states


async def test_redis_restart_with_jobs_queued_loses_nothing(cluster: FaultCluster) -> None:
    client = aioredis.Redis.from_url(cluster.redis.url())
    pubsub = client.pubsub()
    await pubsub.subscribe(f"__keyspace@0__:{RedisKeys().size_stream(Size(width=64, height=64))}")
    try:
        requests = [
            asyncio.create_task(post_generate(cluster.url, seed=s, num_inference_steps=SLOW_STEPS)) for s in range(6)
        ]
        added = 0
        async with asyncio.timeout(60):  # all six accepted: six XADDs on the stream
            while added < 6:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=60)
                added += message is not None and message["data"] == b"xadd"
    finally:
        await pubsub.aclose()
        await client.aclose()
    # On this thread: a child started from a worker thread would be stopped when that thread exits.
    assert cluster.redis.stop() == 0  # a clean shutdown flushes the append-only file
    cluster.redis.start()
    payloads = await asyncio.gather(*requests)
    assert sorted(p["seed"] for p in payloads) == list(range(6))
    assert all(len(p["images"]) == 4 for p in payloads)


async def test_job_survives_its_gateway_and_is_fetchable_from_another(cluster: FaultCluster) -> None:
    client, pubsub = await job_events(cluster.redis.url())
    port = free_port()
    first = cluster.processes.start("doomed-gateway", *gateway_args(cluster.redis.url(), port))
    await wait_http(f"http://127.0.0.1:{port}/healthz", READY_TIMEOUT_S)
    listener = JobListener(client, RedisKeys())
    listening = asyncio.create_task(listener.run())
    try:
        request = asyncio.create_task(post_generate(f"http://127.0.0.1:{port}", seed=9, num_inference_steps=SLOW_STEPS))
        job_id = (await next_start(pubsub))["id"]
        done = listener.expect(job_id)
        first.send_signal(signal.SIGKILL)
        with pytest.raises(aiohttp.ClientError):
            await request
        await asyncio.wait_for(done, 120)
        async with aiohttp.ClientSession() as session, session.get(f"{cluster.url}/v1/jobs/{job_id}") as response:
            body = await response.json()
        assert body["status"] == "succeeded" and len(body["result"]["images"]) == 4
    finally:
        listening.cancel()
        await pubsub.aclose()
        await client.aclose()


# --- A worker holding several jobs at once: stand-in workers (testkit/standin.py), the engine's loop without JAX.

HELD = RedisKeys("held")  # a prefix of its own on the session's Redis: no other test's workers see these jobs


def standin_argv(redis_url: str, worker_id: str) -> list[str]:
    """A stand-in worker with four rows (one per device), 0.05 s a step, a 2 s heartbeat TTL."""
    return [
        sys.executable, "-m", "testkit.standin", "--redis-url", redis_url, "--worker-id", worker_id,
        "--key-prefix", HELD.prefix, "--sizes", "64x64", "--max-steps", str(SLOW_STEPS), "--engine", "rows",
        "--rows-per-device", "1", "--heartbeat-interval", "0.3", "--heartbeat-ttl", "2",
    ]  # fmt: skip


async def test_a_worker_killed_holding_several_jobs_has_each_taken_over_and_answered_once(
    redis_server: RedisProcess, redis_client: aioredis.Redis, processes: ProcessGroup
) -> None:
    url = redis_server.url(0)
    store = JobStore(redis_client, HELD)
    jobs = [make_job(f"held-{k}", Shape(width=64, height=64, steps=SLOW_STEPS), n=1, seed=k) for k in range(4)]
    processes.start_argv("holder", standin_argv(url, "holder"))
    try:
        await wait_ready(url, 1, HELD.prefix)
        async with redis_client.pubsub() as channel:
            await channel.subscribe(HELD.job_events_channel)
            for job in jobs:
                await store.submit(job, HELD.size_stream(Size(width=64, height=64)))
            started = {(await next_start(channel))["worker"] for _ in jobs}
        assert started == {"holder"}  # all four on its device at once
        processes.processes["holder"].send_signal(signal.SIGKILL)
        processes.start_argv("taker", standin_argv(url, "taker"))
        results = [await held_result(redis_client, job.id) for job in jobs]
    finally:
        for name in ("holder", "taker"):
            if name in processes.processes:
                processes.stop(name)
    assert [(r.status, r.worker) for r in results] == [("succeeded", "taker")] * 4
    for job in jobs:
        attempts = await redis_client.lrange(HELD.attempts(job.id), 0, -1)
        assert [a.decode().split("@")[0] for a in attempts if isinstance(a, bytes)] == ["holder", "taker"]
    assert (await JobStreams(redis_client, HELD).counters()).get("duplicate_results", 0) == 0
    stream = HELD.size_stream(Size(width=64, height=64))
    assert (await redis_client.xpending(stream, HELD.workers_group))["pending"] == 0


async def held_result(redis_client: aioredis.Redis, job_id: str) -> JobResult:
    """`job_id`'s result under the `held` prefix, waiting for its announcement on the completions channel."""
    store = JobStore(redis_client, HELD)
    async with redis_client.pubsub() as completions:
        await completions.subscribe(HELD.completions_channel)
        async with asyncio.timeout(120):
            while (result := await store.fetch_meta(job_id)) is None:
                await completions.get_message(ignore_subscribe_messages=True, timeout=1.0)
    return result
