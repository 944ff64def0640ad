"""Worker start-to-ready, cold against warm: what the persistent compilation cache saves.

    sdxl-serve bench start --runs 3                       # the tiny model, its native shape
    sdxl-serve bench start --model DIR --sizes 1024x1024 --runs 3

Each run starts a fresh `sdxl-serve worker` process and stops it once it is ready. The first run starts
on an empty compilation cache (cold); the others start from what the runs before them stored (warm). The
times are the worker's own, read from its `/metrics`: process start to ready, split into init (imports,
Redis, the metrics port), load, lower, compile and warm-up, with the cache's hits and misses. `wall_s` is
the time from spawning the process to seeing it ready in the registry, interpreter start included.

Without `--redis-url` a private redis-server is started; with one, the workers use their own key
prefix, so a running cluster is not disturbed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bench.host import describe
from common.config import default_cache_dir
from common.redis_conn import connect
from common.rediskeys import RedisKeys
from common.registry import Registry, WorkerInfo
from sdxl_serve.up import ensure_tiny_model
from testkit import async_redis_process

PREFIX = "sdxl-bench-start"
PHASES = ("init", "load", "lower", "compile", "warmup")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", help="hub id or local diffusers directory (default: the tiny model, made on first use)"
    )
    parser.add_argument("--sizes", help="WIDTHxHEIGHT,... or sdxl (default: the worker's default)")
    parser.add_argument("--max-steps", type=int, default=None, help="the workers' --max-steps (default: theirs)")
    parser.add_argument("--runs", type=int, default=3, help="worker starts: one cold, then warm ones")
    parser.add_argument("--cpu-devices", type=int, default=4)
    parser.add_argument("--images-per-request", type=int, default=4)
    parser.add_argument("--redis-url", help="an existing Redis (default: a private redis-server)")
    parser.add_argument("--ready-timeout", type=float, default=900.0)
    parser.add_argument("--json", action="store_true", help="one JSON object")


def main(args: argparse.Namespace) -> int:
    if args.runs < 2:
        raise SystemExit("sdxl-serve bench start: --runs must be at least 2 (one cold, one warm)")
    report = asyncio.run(measure(args))
    print(json.dumps(report) if args.json else render(report))
    return 0


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    model = args.model or await ensure_tiny_model(default_cache_dir() / "tiny-model")
    with tempfile.TemporaryDirectory(prefix="sdxl-bench-start-") as scratch:
        cache = Path(scratch) / "jax-cache"
        if args.redis_url is not None:
            runs = [await _start_once(args, args.redis_url, model, cache, n) for n in range(args.runs)]
        else:
            async with async_redis_process() as redis_server:
                runs = [await _start_once(args, redis_server.url(), model, cache, n) for n in range(args.runs)]
    cold, warm = runs[0]["start_to_ready_s"], statistics.median(r["start_to_ready_s"] for r in runs[1:])
    return {
        "measurement": "worker_start",
        "machine": describe(),
        "model": model,
        "sizes": args.sizes,
        "max_steps": args.max_steps,
        "runs": runs,
        "cold_s": cold,
        "warm_median_s": warm,
        "warm_over_cold": warm / cold,
    }


def _serving_flags(args: argparse.Namespace) -> list[str]:
    """The worker's --sizes and --max-steps, where given."""
    sizes = ["--sizes", args.sizes] if args.sizes else []
    return sizes + (["--max-steps", str(args.max_steps)] if args.max_steps else [])


async def _start_once(args: argparse.Namespace, redis_url: str, model: str, cache: Path, n: int) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "sdxl_serve",
        "worker",
        "--redis-url",
        redis_url,
        "--key-prefix",
        PREFIX,
        "--model",
        model,
        "--worker-id",
        f"bench-start-{n}",
        "--cpu-devices",
        str(args.cpu_devices),
        "--images-per-request",
        str(args.images_per_request),
        "--compile-cache",
        str(cache),
    ]
    command += _serving_flags(args)
    spawned = time.perf_counter()
    process = await asyncio.create_subprocess_exec(*command, stdin=asyncio.subprocess.DEVNULL)
    try:
        worker = await _wait_ready(redis_url, process, args.ready_timeout)
        wall = time.perf_counter() - spawned
        samples = await _scrape(f"http://127.0.0.1:{worker.metrics_port}/metrics")
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        await process.wait()
    phases = {phase: samples.get(("sdxl_worker_startup_seconds", phase), 0.0) for phase in PHASES}
    return {
        "run": n,
        "cache": "cold" if n == 0 else "warm",
        "wall_s": wall,
        "start_to_ready_s": samples[("sdxl_worker_start_to_ready_seconds", "")],
        **phases,
        "cache_hits": int(samples.get(("sdxl_worker_compile_cache_total", "hit"), 0)),
        "cache_misses": int(samples.get(("sdxl_worker_compile_cache_total", "miss"), 0)),
    }


async def _wait_ready(redis_url: str, process: asyncio.subprocess.Process, timeout_s: float) -> WorkerInfo:
    redis = connect(redis_url, name="sdxl-bench-start")
    try:
        ready = asyncio.create_task(Registry(redis, RedisKeys(PREFIX)).wait_for_ready(1, timeout_s))
        died = asyncio.create_task(process.wait())
        await asyncio.wait({ready, died}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            raise SystemExit(f"the worker exited with status {process.returncode} before it was ready")
        died.cancel()
        return ready.result()[0]
    finally:
        await redis.aclose()


async def _scrape(url: str) -> dict[tuple[str, str], float]:
    """Samples keyed by name and the value of their one label ('' for none)."""
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        text = await response.text()
    return {
        (s.name, next(iter(s.labels.values()), "")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def render(report: dict[str, Any]) -> str:
    columns = ("run", "cache", "wall_s", "start_to_ready_s", *PHASES, "cache_hits", "cache_misses")
    lines = [
        f"{report['machine']}; model {report['model']}; sizes {report['sizes'] or 'default'}",
        "  ".join(f"{c:>16}" for c in columns),
    ]
    for run in report["runs"]:
        lines.append("  ".join(f"{run[c]:>16.2f}" if isinstance(run[c], float) else f"{run[c]:>16}" for c in columns))
    lines.append(
        f"cold {report['cold_s']:.2f}s, warm median {report['warm_median_s']:.2f}s: warm is "
        f"{100 * report['warm_over_cold']:.0f}% of cold"
    )
    return "\n".join(lines)
