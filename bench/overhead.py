"""Serving overhead and worker start-to-ready on a local cluster.

Starts its own redis-server and `sdxl-serve up --redis-url ...` (so it can read the worker registry),
sends N sequential requests and reports p50/p90 of each timing the gateway returns, the serving overhead
(total_ms minus generate_ms, per request), and each worker's start-to-ready time.

    .venv/bin/python bench/overhead.py --requests 20 [--model DIR --shapes 64x64x20] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.host import describe
from common.rediskeys import RedisKeys
from common.registry import Registry
from sdxl_serve.processes import free_port


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


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


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    for row in rows:
        row["overhead_ms"] = row["total_ms"] - row["generate_ms"]
    keys = ["queued_ms", "generate_ms", "encode_ms", "total_ms", "overhead_ms", "client_ms"]
    return {
        k: {"p50": statistics.median(r[k] for r in rows), "p90": percentile([r[k] for r in rows], 0.9)} for k in keys
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--model", default=None, help="default: the tiny model `sdxl-serve up` makes")
    parser.add_argument("--shapes", default=None)
    parser.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="sdxl-bench-"))
    redis_port, port = free_port(), free_port()
    redis_proc = subprocess.Popen(  # noqa: ASYNC220 (nothing else runs yet)
        [
            shutil.which("redis-server") or "redis-server",
            "--port",
            str(redis_port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(scratch),
        ],
        stdout=subprocess.DEVNULL,
    )
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    up_args = [
        sys.executable,
        "-m",
        "sdxl_serve",
        "up",
        "--redis-url",
        redis_url,
        "--port",
        str(port),
        "--workers",
        str(args.workers),
    ]
    up_args += ["--model", args.model] if args.model else []
    up_args += ["--shapes", args.shapes] if args.shapes else []
    up = subprocess.Popen(up_args, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # noqa: ASYNC220
    try:
        assert up.stdout is not None
        line = up.stdout.readline()
        assert line.startswith("ready:"), f"cluster did not start: {line!r}"
        client = aioredis.Redis.from_url(redis_url)
        workers = await Registry(client, RedisKeys()).workers()
        await client.aclose()
        rows = await run_requests(f"http://127.0.0.1:{port}", args.requests, args.prompt)
    finally:
        up.terminate()
        up.wait(timeout=120)
        redis_proc.terminate()
        redis_proc.wait()
        shutil.rmtree(scratch, ignore_errors=True)

    report = {
        "machine": describe(),
        "requests": args.requests,
        "shapes": [str(s) for w in workers for s in w.shapes][:4],
        "devices": [f"{w.devices}x {w.device_kind}" for w in workers],
        "start_to_ready_s": [round((w.ready_at or 0) - w.started_at, 2) for w in workers],
        "timings_ms": summarize(rows),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"machine: {report['machine']}; workers: {report['devices']}; shapes: {report['shapes']}")
    print(f"worker start-to-ready (s): {report['start_to_ready_s']}")
    print(f"{'timing':<12} {'p50 ms':>9} {'p90 ms':>9}   ({args.requests} sequential requests)")
    for key, stats in report["timings_ms"].items():
        print(f"{key:<12} {stats['p50']:>9.1f} {stats['p90']:>9.1f}")


if __name__ == "__main__":
    asyncio.run(main())
