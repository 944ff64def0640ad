"""`sdxl-serve status`: what an operator asks first: which workers, in what state, and how much is waiting."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import redis.asyncio as aioredis
from pydantic import BaseModel
from redis.exceptions import ResponseError

from common.config import DEFAULT_REDIS_URL, add_eviction_argument, add_redis_arguments, mask_url
from common.redis_conn import UNAVAILABLE, connect
from common.rediskeys import RedisKeys
from common.registry import Registry, WorkerInfo
from common.streams import JobStreams
from sdxl_serve.local_up import find_running


class StreamStatus(BaseModel):
    """One job stream: entries on it (queued plus in service) and how many are delivered but unfinished."""

    stream: str
    length: int
    pending: int


class ClusterStatus(BaseModel):
    """The registry and the queue at one moment."""

    workers: list[WorkerInfo]
    queue_depth: int
    pending: int
    dead_letter: int
    streams: list[StreamStatus]
    counters: dict[str, int]
    at: float


async def read_status(redis: aioredis.Redis, keys: RedisKeys) -> ClusterStatus:
    """Read the cluster's state: a handful of Redis reads, safe to run against production."""
    job_streams = JobStreams(redis, keys)
    streams = [await _stream_status(redis, keys, name) for name in await job_streams.names()]
    return ClusterStatus(
        workers=await Registry(redis, keys).workers(),
        queue_depth=sum(s.length for s in streams),
        pending=sum(s.pending for s in streams),
        dead_letter=await redis.xlen(keys.dead_letter_stream),
        streams=streams,
        counters=await job_streams.counters(),
        at=time.time(),
    )


async def _stream_status(redis: aioredis.Redis, keys: RedisKeys, stream: str) -> StreamStatus:
    try:
        pending = int((await redis.xpending(stream, keys.workers_group))["pending"])
    except ResponseError:  # no group yet (a stream created by a submit before any worker read it)
        pending = 0
    return StreamStatus(stream=stream, length=await redis.xlen(stream), pending=pending)


def render(status: ClusterStatus) -> str:
    """A plain-text table for a terminal."""
    header = ("WORKER", "HOST", "DEVICES", "SIZES", "STEPS", "SCHEDULERS", "STATE", "ROWS", "JOBS", "HEARTBEAT")
    rows = [header] + [
        (
            w.id,
            w.host,
            f"{w.devices} x {w.device_kind}",
            ",".join(map(str, w.sizes)),
            f"1..{w.max_steps}",
            ",".join(w.schedulers),
            f"{w.state}: {w.phase}" if w.phase else w.state,
            f"{w.rows - w.free_rows}/{w.rows}" if w.rows else "-",  # rows held of its batch; "-": one job at a time
            str(w.jobs_done),
            f"{max(0.0, status.at - w.last_heartbeat):.1f}s ago",
        )
        for w in status.workers
    ]
    widths = [max(len(row[k]) for row in rows) for k in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    if not status.workers:
        lines.append("(no worker registered)")
    lines += [
        "",
        f"queue depth {status.queue_depth} (of which in service or held: {status.pending}), "
        f"dead letters {status.dead_letter}",
    ]
    lines += [f"  {s.stream}: {s.length} on stream, {s.pending} pending" for s in status.streams]
    if status.counters:
        lines.append("counters: " + ", ".join(f"{k} {v}" for k, v in sorted(status.counters.items())))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the cluster's Redis is (default: that of the `sdxl-serve up` running here, else the usual local
    port), and the output format."""
    add_redis_arguments(parser, default=None)
    add_eviction_argument(parser)
    parser.add_argument("--json", action="store_true", help="one JSON object instead of a table")


def run(args: argparse.Namespace) -> int:
    """Print the status once; 1 if Redis cannot be reached."""
    redis_url, key_prefix = where(args.redis_url, args.key_prefix)
    return asyncio.run(
        _print_status(redis_url, key_prefix, as_json=args.json, allow_evicting=args.allow_evicting_redis)
    )


def where(redis_url: str | None, key_prefix: str) -> tuple[str, str]:
    """The Redis URL and key prefix to read: those given, else those of the `sdxl-serve up` running on this
    machine (saying so on stderr), else the usual local Redis."""
    if redis_url is not None:
        return redis_url, key_prefix
    running = find_running()
    if running is None:
        return DEFAULT_REDIS_URL, key_prefix
    print(
        f"sdxl-serve status: the cluster of sdxl-serve up (pid {running.pid}), Redis {mask_url(running.redis_url)}",
        file=sys.stderr,
    )
    return running.redis_url, running.key_prefix


async def _print_status(redis_url: str, key_prefix: str, *, as_json: bool, allow_evicting: bool = False) -> int:
    redis = connect(redis_url, name="sdxl-status", allow_evicting=allow_evicting)
    try:
        status = await read_status(redis, RedisKeys(key_prefix))
    except UNAVAILABLE as exc:
        print(
            f"sdxl-serve status: cannot reach Redis at {mask_url(redis_url)}: {exc} "
            "(give its --redis-url, or start a cluster with `sdxl-serve up`)",
            file=sys.stderr,
        )
        return 1
    finally:
        await redis.aclose()
    print(status.model_dump_json(indent=2) if as_json else render(status))
    return 0
