"""The persistent compilation cache on real worker processes: a restart compiles nothing.

Two workers start at once on one empty cache directory (the shared-host case: JAX's file lock keeps
them from reading each other's half-written entries); a third then starts from what they stored and
finds every executable there. A worker with `--no-compile-cache` neither reads nor writes it.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
import redis

from common.protocol import Shape
from common.registry import WorkerInfo
from tests.support import (
    READY_TIMEOUT_S,
    TEST_SHAPES,
    ProcessGroup,
    RedisServer,
    Samples,
    scrape,
    tiny_worker_args,
    wait_ready,
)

pytestmark = pytest.mark.e2e

SHAPE: Shape = TEST_SHAPES[0]
PREFIX = "cache"
HITS = ("sdxl_worker_compile_cache_total", (("result", "hit"),))
MISSES = ("sdxl_worker_compile_cache_total", (("result", "miss"),))


def start(processes: ProcessGroup, redis_url: str, model: Path, worker_id: str, *cache: str) -> None:
    processes.start(worker_id, *tiny_worker_args(redis_url, model, worker_id, "--key-prefix", PREFIX, *cache))


async def ready(processes: ProcessGroup, redis_url: str, ids: list[str]) -> dict[str, WorkerInfo]:
    try:
        workers = await wait_ready(redis_url, len(ids), prefix=PREFIX)
    except TimeoutError:
        pytest.fail(f"not ready in {READY_TIMEOUT_S}s:\n" + "\n".join(processes.log(i)[-3000:] for i in ids))
    return {w.id: w for w in workers}


def entries(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


async def metrics(worker: WorkerInfo) -> Samples:
    async with aiohttp.ClientSession() as session:
        return await scrape(session, f"http://127.0.0.1:{worker.metrics_port}")


async def test_workers_share_a_cache_and_a_restart_compiles_nothing(
    redis_server: RedisServer, tiny_model: Path, processes: ProcessGroup, tmp_path: Path
) -> None:
    redis_url = redis_server.url(2)
    redis.Redis.from_url(redis_url).flushdb()
    cache = tmp_path / "jax-cache"
    cold = ["cold-a", "cold-b"]
    for worker_id in cold:
        start(processes, redis_url, tiny_model, worker_id, "--compile-cache", str(cache))
    workers = await ready(processes, redis_url, cold)
    for worker_id in cold:
        samples = await metrics(workers[worker_id])
        assert samples.get(MISSES, 0) >= 3, samples  # begin, one step, finish: none was there yet
        processes.stop(worker_id)
    assert entries(cache)

    start(processes, redis_url, tiny_model, "warm", "--compile-cache", str(cache))
    samples = await metrics((await ready(processes, redis_url, ["warm"]))["warm"])
    assert samples.get(MISSES, 0) == 0, samples
    assert samples[HITS] >= 3
    phases = {dict(labels)["phase"] for name, labels in samples if name == "sdxl_worker_startup_seconds"}
    assert phases == {"init", "load", "lower", "compile", "warmup"}
    assert "start to ready" in processes.log("warm")
    processes.stop("warm")


async def test_a_worker_without_the_cache_neither_reads_nor_writes_it(
    redis_server: RedisServer, tiny_model: Path, processes: ProcessGroup, compile_cache: Path
) -> None:
    redis_url = redis_server.url(2)
    redis.Redis.from_url(redis_url).flushdb()
    before = entries(compile_cache)
    # The session's cache is in SDXL_SERVE_COMPILE_CACHE; the flag overrides it.
    start(processes, redis_url, tiny_model, "uncached", "--no-compile-cache")
    samples = await metrics((await ready(processes, redis_url, ["uncached"]))["uncached"])
    assert HITS not in samples and MISSES not in samples
    assert "compilation cache: off" in processes.log("uncached")
    processes.stop("uncached")
    assert entries(compile_cache) == before
