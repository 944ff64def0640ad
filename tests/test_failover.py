"""A Redis failover under load: a real gateway and worker reach Redis through Sentinel, the primary is SIGKILLed
while jobs are being accepted and run, and every accepted job is still answered.

Gateway and worker keep images in a shared directory (`--blob-store file://...`), as a fleet would on a shared
volume: the worker writes them before the result, and the gateway reads them from there.

The gateway runs with `--durable-accept replica`: a job is accepted (202, or the 200 of a synchronous
request) only once the replica holds it, so the promoted replica has every accepted job. Without it, a job
accepted in the moment before the kill can be lost; docs/benchmarks.md measures that window.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from common.jobstore import DurableAccept
from common.protocol import Shape
from common.redis_conn import connect
from common.rediskeys import RedisKeys
from common.registry import Registry
from gateway.app import create_app
from gateway.config import GatewayConfig
from sdxl_serve.processes import free_port, wait_http
from testkit import gateway_args
from testkit.sentinel import SentinelGroup, start_sentinel_group
from tests.support import READY_TIMEOUT_S, ClientFactory, ProcessGroup, read_events, register_worker, tiny_worker_args

pytestmark = pytest.mark.e2e

JOB = {"prompt": "a red fox", "width": 64, "height": 64, "num_inference_steps": 2}
SHAPE = Shape(width=64, height=64, steps=2)
# Jobs accepted before the kill, and after the new master is announced, before the load stops.
BEFORE_KILL = 3
AFTER_SWITCH = 3


@dataclass
class Load:
    """Submitters' record: the ids of accepted jobs and how many submits were refused (503) meanwhile."""

    accepted: list[str] = field(default_factory=list)
    refused: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def until(self, count: int) -> None:
        while len(self.accepted) < count:
            self.changed.clear()
            await self.changed.wait()


@dataclass
class FailoverCluster:
    url: str
    sentinels: SentinelGroup
    images: Path


@pytest.fixture
async def failover_cluster(tiny_model: Path, tmp_path: Path) -> AsyncIterator[FailoverCluster]:
    sentinels = await start_sentinel_group(tmp_path / "redis")
    redis_url = sentinels.url()
    processes = ProcessGroup(tmp_path)
    port = free_port()
    blob_store = f"file://{tmp_path / 'images'}"
    flags = ["--durable-accept", "replica", "--durable-accept-timeout", "2", "--blob-store", blob_store]
    processes.start("gateway", *gateway_args(redis_url, port, *flags))
    worker = tiny_worker_args(redis_url, tiny_model, "failover-worker", "--blob-store", blob_store)
    processes.start("worker", *worker)
    try:
        client = connect(redis_url, name="test-failover")
        try:
            await Registry(client, RedisKeys()).wait_for_ready(1, READY_TIMEOUT_S)
        finally:
            await client.aclose()
        await wait_http(f"http://127.0.0.1:{port}/healthz", READY_TIMEOUT_S)
        yield FailoverCluster(url=f"http://127.0.0.1:{port}", sentinels=sentinels, images=tmp_path / "images")
    finally:
        processes.stop_all()
        await sentinels.close()


async def submit_until_stopped(
    session: aiohttp.ClientSession, url: str, load: Load, stop: asyncio.Event, name: str
) -> None:
    """Submit jobs one after another until `stop`; a refused submit (503: Redis unreachable, or the replica did
    not confirm) is not an accepted job and is simply retried with its Idempotency-Key."""
    for n in itertools.count():
        if stop.is_set():
            return
        key = f"{name}-{n}"
        while not stop.is_set():
            async with session.post(f"{url}/v1/jobs", json=JOB, headers={"Idempotency-Key": key}) as response:
                body: dict[str, Any] = await response.json()
                if response.status == 202:
                    if body["id"] not in load.accepted:
                        load.accepted.append(body["id"])
                    load.changed.set()
                    break
                assert response.status == 503, body
                load.refused += 1
                await asyncio.sleep(float(response.headers.get("Retry-After", "1")) / 4)


async def generate_until_answered(session: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    """A synchronous request from a client that keeps the API's contract: a 503 (no primary yet, or the job not
    confirmed by a replica in time, which a request sent just before the kill may get) is sent again with the
    same Idempotency-Key, so the job it was accepted as is the one answered, once."""
    while True:
        async with session.post(f"{url}/v1/generate", json=JOB, headers={"Idempotency-Key": "sync"}) as response:
            body: dict[str, Any] = await response.json()
            if response.status != 503:
                return response.status, body
            retry_after = float(response.headers.get("Retry-After", "1"))
        await asyncio.sleep(retry_after / 4)


async def final_status(session: aiohttp.ClientSession, url: str, job_id: str) -> str:
    """Follow a job's events to their end, then read its status."""
    async with session.get(f"{url}/v1/jobs/{job_id}/events") as response:
        assert response.status == 200, await response.text()
        async for _name, _data in read_events(response):
            pass
    async with session.get(f"{url}/v1/jobs/{job_id}") as response:
        state: dict[str, Any] = await response.json()
        assert response.status == 200, state
        return str(state["status"])


async def test_every_accepted_job_is_answered_across_a_failover(failover_cluster: FailoverCluster) -> None:
    url = failover_cluster.url
    load, stop = Load(), asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=READY_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        submitters = [asyncio.create_task(submit_until_stopped(session, url, load, stop, f"s{n}")) for n in range(2)]
        waiting = asyncio.create_task(generate_until_answered(session, url))
        await load.until(BEFORE_KILL)
        await failover_cluster.sentinels.kill_primary()  # right after an acceptance, with more in flight
        sentinels = failover_cluster.sentinels
        assert await sentinels.switched() == ("127.0.0.1", sentinels.replica.port)
        # No replica now: nothing is accepted (503) until the old primary is back as one.
        await sentinels.rejoin()
        await asyncio.wait_for(load.until(len(load.accepted) + AFTER_SWITCH), READY_TIMEOUT_S)
        stop.set()
        await asyncio.gather(*submitters)
        status, answer = await waiting  # a synchronous request sent before the kill
        assert status == 200, answer
        assert len(answer["images"]) == 4  # read back from the image store
        statuses = {job_id: await final_status(session, url, job_id) for job_id in load.accepted}
    assert statuses == dict.fromkeys(load.accepted, "succeeded")
    stored = {path.parts[-3] for path in (failover_cluster.images / "ttl-3600").glob("*/*/*.png")}
    assert set(load.accepted) <= stored  # every result's images are objects in the store


@pytest.mark.parametrize("durable_accept", ["off", "replica"])
async def test_a_job_accepted_before_its_gateway_restarted_survives_a_failover_only_if_durable(
    tmp_path: Path, aiohttp_client: ClientFactory, durable_accept: DurableAccept
) -> None:
    """The gap docs/delivery.md names: a gateway re-queues a job Redis lost only while it remembers accepting
    it. Accepted while the replica lags, the gateway restarted, then the primary dies: with `--durable-accept
    off` the job was answered 202 and is gone; with `replica` it was never answered 202 (503 not_durable, the
    client retries), and every job that was is on the promoted replica."""
    group = await start_sentinel_group(tmp_path / "redis", relayed=True)
    assert group.link is not None
    config = GatewayConfig(
        redis_url=group.url(),
        durable_accept=durable_accept,
        durable_accept_timeout_s=0.5,
        result_ttl_s=600,
    )
    redis = connect(group.url(), name="test-durable-gap")
    try:
        await register_worker(redis, shapes=(SHAPE,))
        first = await aiohttp_client(create_app(config))
        in_sync = await first.post("/v1/jobs", json=JOB, headers={"Idempotency-Key": "in-sync"})
        assert in_sync.status == 202, await in_sync.text()
        group.link.hold()  # the replica falls behind: what the primary takes now is on the primary alone
        lagging = await first.post("/v1/jobs", json=JOB, headers={"Idempotency-Key": "lagging"})
        accepted = [await in_sync.json()] + ([await lagging.json()] if lagging.status == 202 else [])
        assert lagging.status == (202 if durable_accept == "off" else 503), await lagging.text()
        await first.close()  # the gateway restarts: what it remembered accepting is gone with it
        await group.kill_primary()
        group.link.cut()
        await group.switched()
        second = await aiohttp_client(create_app(config))
        found = {job["id"]: (await second.get(f"/v1/jobs/{job['id']}")).status for job in accepted}
    finally:
        await redis.aclose()
        await group.close()
    lost = [job_id for job_id, status in found.items() if status != 200]
    assert lost == ([accepted[1]["id"]] if durable_accept == "off" else []), found
