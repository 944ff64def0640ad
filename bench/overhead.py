"""Serving overhead and worker start-to-ready on a local cluster.

Starts its own redis-server and `sdxl-serve up --redis-url ...` (so it can read the worker registry),
sends N sequential requests and reports p50/p90 of each timing the gateway returns, the serving overhead
(total_ms minus generate_ms, per request), and each worker's start-to-ready time.

With --count-commands, a MONITOR connection counts the commands the gateway and the worker send while the
requests run (not those a Lua script runs inside Redis; a pipeline's commands one by one, and background
work such as heartbeats and idle blocking reads included), per request and by command.

    .venv/bin/python bench/overhead.py --requests 20 [--model DIR --sizes 64x64] [--count-commands] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.host import describe
from bench.quantiles import percentile
from common.rediskeys import RedisKeys
from common.registry import Registry, WorkerInfo
from testkit import async_redis_process, free_port, sdxl_serve_argv


async def run_requests(url: str, count: int, prompt: str) -> list[dict[str, Any]]:
    rows = []
    async with aiohttp.ClientSession() as session:
        for i in range(count):
            started = time.perf_counter()
            async with session.post(f"{url}/v1/generate", json={"prompt": prompt, "seed": i}) as response:
                body = await response.json()
                assert response.status == 200, body
            rows.append({**body["timings"], "client_ms": (time.perf_counter() - started) * 1000})
    return rows


# `1700000000.123456 [0 127.0.0.1:5555] "EVALSHA" "..."`: the client (or `lua`) and the command's name.
MONITOR_LINE_LIMIT = 1 << 28
_MONITOR_LINE = re.compile(r'^[\d.]+ \[\d+ ([^\]]+)\] "([^"]+)"')


class CommandCounter:
    """Commands sent to Redis by clients (not by scripts), by client and command name, from MONITOR."""

    def __init__(self, redis_url: str) -> None:
        self._url = redis_url
        self._client = aioredis.Redis.from_url(redis_url)
        self._seen: collections.Counter[tuple[str, str]] = collections.Counter()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # A plain socket with a large line limit: MONITOR lines carry whole images, past redis-py's reader.
        address = urllib.parse.urlsplit(self._url)
        reader, writer = await asyncio.open_connection(address.hostname, address.port, limit=MONITOR_LINE_LIMIT)
        writer.write(b"MONITOR\r\n")
        assert await reader.readline() == b"+OK\r\n"
        self._task = asyncio.create_task(self._count(reader, writer))

    async def _count(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                if found := _MONITOR_LINE.match(line[1:].decode(errors="replace")):
                    client, command = found.groups()
                    if client != "lua":
                        self._seen[(client, command.upper())] += 1
        finally:
            writer.close()

    async def stop(self, requests: int) -> dict[str, dict[str, float]]:
        """Commands per request by role (gateway, worker) and command name."""
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        names = {f"{c['addr']}": str(c.get("name") or "") for c in await self._client.client_list()}
        await self._client.aclose()
        per_role: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        for (address, command), calls in self._seen.items():
            role = names.get(address, "").split(":", 1)[0].removeprefix("sdxl-") or "other"
            per_role[role][command] += calls
        return {
            role: {"total": round(sum(c.values()) / requests, 2)}
            | {name: round(calls / requests, 2) for name, calls in sorted(c.items())}
            for role, c in sorted(per_role.items())
        }


async def measured_requests(
    redis_url: str, url: str, args: argparse.Namespace
) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    """The requests' timings, and the commands they cost when asked to count them."""
    counter = CommandCounter(redis_url) if args.count_commands else None
    if counter is not None:
        await counter.start()
    rows = await run_requests(url, args.requests, args.prompt)
    return rows, (await counter.stop(args.requests) if counter is not None else {})


def print_report(report: dict[str, Any], requests: int) -> None:
    print(f"machine: {report['machine']}; workers: {report['devices']}; sizes: {report['sizes']}")
    print(f"worker start-to-ready (s): {report['start_to_ready_s']}")
    print(f"{'timing':<12} {'p50 ms':>9} {'p90 ms':>9}   ({requests} sequential requests)")
    for key, stats in report["timings_ms"].items():
        print(f"{key:<12} {stats['p50']:>9.1f} {stats['p90']:>9.1f}")
    for role, counts in report.get("commands_per_request", {}).items():
        print(f"commands per request, {role}: " + ", ".join(f"{k} {v:g}" for k, v in counts.items()))


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    for row in rows:
        row["overhead_ms"] = row["total_ms"] - row["generate_ms"]
    keys = ["queued_ms", "generate_ms", "encode_ms", "total_ms", "overhead_ms", "client_ms"]
    return {
        k: {"p50": statistics.median(r[k] for r in rows), "p90": percentile([r[k] for r in rows], 0.9)} for k in keys
    }


async def run_cluster(
    args: argparse.Namespace, redis_url: str
) -> tuple[list[WorkerInfo], list[dict[str, Any]], dict[str, dict[str, float]]]:
    """`sdxl-serve up` on `redis_url`: its workers once ready, the timings of the requests sent to it, and
    the commands they cost (when counted)."""
    port = free_port()
    up_args = sdxl_serve_argv("up", "--redis-url", redis_url, "--port", str(port), "--workers", str(args.workers))
    up_args += ["--model", args.model] if args.model else []
    up_args += ["--sizes", args.sizes] if args.sizes else []
    up = subprocess.Popen(up_args, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # noqa: ASYNC220
    try:
        assert up.stdout is not None
        line = up.stdout.readline()
        assert line.startswith("ready:"), f"cluster did not start: {line!r}"
        client = aioredis.Redis.from_url(redis_url)
        workers = await Registry(client, RedisKeys()).workers()
        await client.aclose()
        rows, commands = await measured_requests(redis_url, f"http://127.0.0.1:{port}", args)
        return workers, rows, commands
    finally:
        up.terminate()
        up.wait(timeout=120)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--model", default=None, help="default: the tiny model `sdxl-serve up` makes")
    parser.add_argument("--sizes", default=None, help="WIDTHxHEIGHT,... the workers compile (default: native)")
    parser.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    parser.add_argument("--count-commands", action="store_true", help="count the commands sent to Redis (MONITOR)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    async with async_redis_process() as redis_server:
        workers, rows, commands = await run_cluster(args, redis_server.url())

    report = {
        "machine": describe(),
        "requests": args.requests,
        "sizes": [str(s) for w in workers for s in w.sizes][:4],
        "devices": [f"{w.devices}x {w.device_kind}" for w in workers],
        "start_to_ready_s": [round((w.ready_at or 0) - w.started_at, 2) for w in workers],
        "timings_ms": summarize(rows),
    } | ({"commands_per_request": commands} if commands else {})
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print_report(report, args.requests)


if __name__ == "__main__":
    asyncio.run(main())
