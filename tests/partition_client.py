"""The client side of tests/test_partition.py, run on its own namespace "host" (the test process cannot
reach the test network's addresses). It talks to the test on stdout/stdin, one JSON line at a time:

1. waits for two ready workers, sends a slow request, prints {"started": WORKER} when a worker takes it;
2. prints {"response": ...} when the gateway answers (the test has cut that worker's link meanwhile);
3. reads one line from stdin (the test restored the link), waits until the cut worker's late result
   has been dropped as a duplicate, and prints {"after": ...} with what clients now see.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from bench.chaos import digest, stored_digest
from common.rediskeys import RedisKeys
from common.registry import Registry
from common.streams import JobStreams

KEYS = RedisKeys()


def say(**payload: Any) -> None:
    print(json.dumps(payload), flush=True)


async def main(redis_url: str, gateway_url: str, steps: int) -> None:
    client = aioredis.Redis.from_url(redis_url)
    await Registry(client, KEYS).wait_for_ready(2, timeout_s=300)
    events = client.pubsub()
    await events.subscribe(KEYS.job_events_channel, f"__keyspace@0__:{KEYS.stats}")
    async with aiohttp.ClientSession() as session:
        request = asyncio.create_task(_post(session, gateway_url, steps))
        say(started=await _started(events))
        response = await request
        say(response={"id": response["id"], "worker": response["worker"], "digest": digest(response["images"])})
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        await _duplicate_dropped(events, JobStreams(client, KEYS))
        worker, stored = await stored_digest(session, gateway_url, response["id"])
        say(after={"worker": worker, "digest": stored, "stats": await JobStreams(client, KEYS).counters()})
    await events.aclose()
    await client.aclose()


async def _post(session: aiohttp.ClientSession, gateway_url: str, steps: int) -> dict[str, Any]:
    body = {"prompt": "a lighthouse", "seed": 3, "num_inference_steps": steps}
    async with session.post(f"{gateway_url}/v1/generate", json=body) as response:
        payload: dict[str, Any] = await response.json()
        assert response.status == 200, payload
        return payload


async def _started(events: aioredis.client.PubSub) -> str:
    while True:
        message = await events.get_message(ignore_subscribe_messages=True, timeout=300)
        if message and message["channel"] == KEYS.job_events_channel.encode():
            return str(json.loads(message["data"])["worker"])


async def _duplicate_dropped(events: aioredis.client.PubSub, streams: JobStreams) -> None:
    """Wait for the stats hash to count a dropped duplicate (announced by keyspace notifications)."""
    async with asyncio.timeout(180):
        while (await streams.counters()).get("duplicate_results", 0) < 1:
            await events.get_message(ignore_subscribe_messages=True, timeout=180)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
