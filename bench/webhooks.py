"""Job webhooks on a local cluster: how soon a webhook arrives after its job ends, and how many deliveries one
gateway sends per second.

Starts a redis-server, one gateway and stand-in workers (testkit/standin.py: the real worker loop, no model),
and a receiver on loopback (testkit/receiver.py) that answers 200 at once.

Latency: `--jobs` jobs submitted through `POST /v1/jobs` with a webhook, `--in-flight` at a time; for each,
the time from the job's end (the Redis time at which the script that stored its result made its webhook
due) to the webhook's arrival at the receiver (the same machine's clock).

Throughput: with the gateway stopped, `--backlog` jobs with webhooks are made terminal (submitted and
cancelled, which makes their `completed` message due as a worker's result does); then a gateway starts and
sends them all: deliveries per second from its first to its last arrival.

    sdxl-serve bench webhooks [--jobs 200] [--backlog 2000] [--concurrency 32] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from bench.host import describe
from common.apikeys import new_webhook_secret
from common.jobstore import JobStore
from common.protocol import Shape
from common.rediskeys import RedisKeys
from common.registry import Registry
from common.webhooks import Outbox, WebhookSpec
from testkit import ProcessGroup, RedisOptions, free_port, gateway_args, redis_process, wait_http
from testkit.jobs import make_job
from testkit.receiver import Hit, Receiver

SHAPE = Shape(width=64, height=64, steps=2)
KEYS = RedisKeys()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", type=int, default=200, help="jobs for the latency measurement")
    parser.add_argument("--in-flight", type=int, default=8, help="jobs submitted at a time")
    parser.add_argument("--workers", type=int, default=2, help="stand-in workers")
    parser.add_argument("--backlog", type=int, default=2000, help="due messages for the throughput measurement")
    parser.add_argument("--concurrency", type=int, default=32, help="the gateway's --webhook-concurrency")
    parser.add_argument("--json", action="store_true", help="one JSON object")


def main(args: argparse.Namespace) -> int:
    report = asyncio.run(run(args))
    print(json.dumps(report) if args.json else "\n".join(f"{k:<28} {v}" for k, v in report.items()))
    return 0


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="sdxl-bench-webhooks-") as scratch, redis_process(RedisOptions()) as redis:
        processes = ProcessGroup(Path(scratch))
        receiver = await Receiver().start()
        client = aioredis.Redis.from_url(redis.url())
        try:
            for k in range(args.workers):
                processes.start_argv(f"worker-{k}", _standin_argv(redis.url(), f"standin-{k}"))
            port = _gateway(processes, "gateway-1", redis.url(), args.concurrency)
            await wait_http(f"http://127.0.0.1:{port}/readyz", 120)
            await Registry(client, KEYS).wait_for_ready(args.workers, 120)  # the gateway's readiness is its own
            latency = await _latency(client, receiver, port, args.jobs, args.in_flight)
            processes.stop("gateway-1")
            throughput = await _throughput(client, receiver, processes, redis.url(), args)
        finally:
            processes.stop_all()
            await receiver.close()
            await client.aclose()
    return {
        "machine": describe(),
        "command": "sdxl-serve bench webhooks " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in _flags(args)),
        **latency,
        **throughput,
    }


def _flags(args: argparse.Namespace) -> list[tuple[str, Any]]:
    return [(k, getattr(args, k)) for k in ("jobs", "in_flight", "workers", "backlog", "concurrency")]


def _standin_argv(redis_url: str, worker_id: str) -> list[str]:
    return [sys.executable, "-m", "testkit.standin", "--redis-url", redis_url, "--worker-id", worker_id,
            "--sizes", str(SHAPE.size), "--max-steps", str(SHAPE.steps), "--step-s", "0.005",
            "--log-level", "warning"]  # fmt: skip


SECRET = new_webhook_secret()


def _gateway(processes: ProcessGroup, name: str, redis_url: str, concurrency: int) -> int:
    port = free_port()
    processes.start(
        name, "--log-level", "warning", *gateway_args(redis_url, port),
        "--webhook-allow-http", "--webhook-allow-hosts", "127.0.0.1", "--webhook-secret", SECRET,
        "--webhook-concurrency", str(concurrency), "--webhook-max-outbox", "0",
        "--rate-limit-address-submit", "off", "--rate-limit-address-read", "off", "--max-queue-depth", "0",
    )  # fmt: skip
    return port


async def _latency(client: aioredis.Redis, receiver: Receiver, port: int, jobs: int, in_flight: int) -> dict[str, Any]:
    """Job end to webhook arrival, over `jobs` jobs."""
    gate = asyncio.Semaphore(in_flight)
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:

        async def one(seed: int) -> None:
            async with gate:
                arrived = len(receiver.hits)
                body = {"prompt": "a kite", "seed": seed, "webhook": {"url": receiver.url}}
                async with http.post("/v1/jobs", json=body) as response:
                    assert response.status == 202, await response.text()
                await receiver.wait_for(arrived + 1, 120)

        await asyncio.gather(*(one(seed) for seed in range(jobs)))
        await receiver.wait_for(jobs, 120)
    lags = [await _lag(client, hit) for hit in receiver.hits[:jobs]]
    lags.sort()
    return {
        "latency_jobs": jobs,
        "lag_p50_ms": round(statistics.median(lags), 1),
        "lag_p99_ms": round(lags[min(len(lags) - 1, int(0.99 * len(lags)))], 1),
        "lag_max_ms": round(lags[-1], 1),
    }


async def _lag(client: aioredis.Redis, hit: Hit) -> float:
    """Milliseconds from the job's end (its message's creation, Redis time) to the hit's arrival."""
    job_id = json.loads(hit.body)["data"]["id"]
    (message,) = await Outbox(client, KEYS).messages(job_id)
    return hit.wall * 1000 - message.created_ms


async def _throughput(
    client: aioredis.Redis, receiver: Receiver, processes: ProcessGroup, redis_url: str, args: argparse.Namespace
) -> dict[str, Any]:
    """Deliveries per second of one gateway draining a backlog of due messages."""
    store, spec = JobStore(client, KEYS), WebhookSpec(url=receiver.url)
    stream = KEYS.size_stream("bench-backlog")  # no worker reads it: the jobs are cancelled at once
    for _ in range(args.backlog):
        job = make_job(uuid.uuid4().hex, SHAPE, prompt="a kite", result_ttl_s=3600)
        await store.submit(job, stream, webhook=spec)
        await store.cancel(job.id)
    before = len(receiver.hits)
    port = _gateway(processes, "gateway-2", redis_url, args.concurrency)
    await wait_http(f"http://127.0.0.1:{port}/healthz", 120)
    hits = (await receiver.wait_for(before + args.backlog, 600))[before:]
    span = hits[-1].at - hits[0].at
    return {
        "backlog": args.backlog,
        "drain_s": round(span, 2),
        "deliveries_per_s": round((len(hits) - 1) / span, 1) if span > 0 else None,
    }
