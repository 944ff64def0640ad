"""How long the device waits between back-to-back jobs: the real worker loop, jobs queued ahead of it.

    sdxl-serve bench backtoback --model ~/.cache/sdxl-serve/tiny-model --jobs 12 --noise-images 1024

Starts a private redis-server, runs a worker in this process on the model (4 virtual CPU devices when there is
no accelerator), queues `--jobs` jobs at once on its shape's stream and records when each generation starts and
ends on the device. The device's idle time between two jobs is the gap from one generation's end to the next
one's start: whatever the loop does in between (encoding, storing, claiming, announcing the start).

`--noise-images N` hands the encoder N x N noise in place of the model's output, so each job encodes what four
full-size images cost (PNG's worst case) while the device work stays the model's own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from bench.host import describe

if TYPE_CHECKING:  # imported when measuring, after the CPU devices are configured
    from common.jobstore import JobStore
    from common.protocol import Job, Shape
    from common.rediskeys import RedisKeys
    from worker.pipeline import SDXLPipeline
    from worker.runner import Worker

PROMPT = "a lighthouse at dusk"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="hub id or local diffusers directory (the tiny model)")
    parser.add_argument("--shape", default="64x64x20", help="WIDTHxHEIGHTxSTEPS")
    parser.add_argument("--jobs", type=int, default=12, help="jobs queued at once; the first is not counted")
    parser.add_argument("--noise-images", type=int, default=0, help="encode N x N noise images instead (0: off)")
    parser.add_argument(
        "--cancel",
        action="store_true",
        help="measure cancel-to-free instead: --jobs rounds of a long job cancelled at its first progress event, "
        "then a short one",
    )
    parser.add_argument("--cancel-steps", type=int, default=40, help="steps of the job that --cancel cancels")
    parser.add_argument("--cpu-devices", type=int, default=4)
    parser.add_argument("--json", action="store_true")


def main(args: argparse.Namespace) -> int:
    if args.jobs < (1 if args.cancel else 3):
        raise SystemExit(
            "--jobs must be >= 3 (the first job warms up, and gaps need two jobs after it); >= 1 with --cancel"
        )
    from worker.cli import use_cpu_devices

    use_cpu_devices(args.cpu_devices)
    report = asyncio.run(measure_cancel(args) if args.cancel else measure(args))
    print(json.dumps(report) if args.json else "\n".join(f"{k:<28} {_text(v)}" for k, v in report.items()))
    return 0


class _Timed:
    """The pipeline, with the start and end of each generation recorded (and its images swapped for noise)."""

    def __init__(self, pipeline: SDXLPipeline, noise_size: int) -> None:
        self._pipeline = pipeline
        self.spans: list[tuple[float, float]] = []
        shape = (pipeline.images_per_request, noise_size, noise_size, 3)
        self._noise = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8) if noise_size else None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipeline, name)

    def generate(self, *args: Any, **kwargs: Any) -> np.ndarray:
        started = time.perf_counter()
        try:
            images = self._pipeline.generate(*args, **kwargs)
        finally:  # a generation stopped by a cancel ends here too
            self.spans.append((started, time.perf_counter()))
        return images if self._noise is None else self._noise


@dataclass
class _Serving:
    """A ready worker in this process, on a private redis-server, and what the benchmark reads of it."""

    worker: Worker
    redis: Any
    timed: _Timed
    keys: RedisKeys
    store: JobStore


@contextlib.asynccontextmanager
async def _serving(args: argparse.Namespace, shapes: tuple[Shape, ...]) -> AsyncIterator[_Serving]:
    from common.jobstore import JobStore
    from common.redis_conn import connect
    from common.rediskeys import RedisKeys
    from sdxl_serve.processes import start_redis_server, stop
    from worker.config import WorkerConfig
    from worker.pipeline import PipelineOptions, SDXLPipeline
    from worker.runner import Worker

    timed: list[_Timed] = []

    def load() -> SDXLPipeline:
        timed.append(
            _Timed(
                SDXLPipeline.load(args.model, None, PipelineOptions(4, max_steps=config.max_steps)), args.noise_images
            )
        )
        return cast("SDXLPipeline", timed[0])

    with tempfile.TemporaryDirectory() as directory:
        server = await start_redis_server(Path(directory))
        redis = connect(server.url(), name="bench-backtoback")
        config = WorkerConfig(
            redis_url=server.url(), model=args.model, worker_id="bench", claim_block_ms=100, compile_cache_dir=None,
            sizes=tuple(dict.fromkeys(shape.size for shape in shapes)),
            max_steps=max(shape.steps for shape in shapes), default_steps=shapes[0].steps,
        )  # fmt: skip
        worker = Worker(config, redis, load_pipeline=load)
        running = asyncio.create_task(worker.run())
        try:
            while worker.info.state != "ready":
                if running.done():
                    running.result()
                await asyncio.sleep(0.05)
            keys = RedisKeys(config.key_prefix)
            yield _Serving(worker, redis, timed[0], keys, JobStore(redis, keys))
        finally:
            worker.stop()
            await running
            await redis.aclose()
            await stop([server.process], 5.0)


def _job(job_id: str, seed: int, shape: Shape) -> Job:
    from testkit.jobs import make_job

    return make_job(job_id, shape, prompt=PROMPT, seed=seed, result_ttl_s=600)


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run the jobs through a worker; the gaps between generations, and where each job's time went."""
    from common.protocol import Shape

    shape = Shape.parse(args.shape)
    async with _serving(args, (shape,)) as serving:
        results = await _run_jobs(serving, shape, args.jobs)
    return _report(args, shape, serving.timed, results)


async def _run_jobs(serving: _Serving, shape: Shape, jobs: int) -> list[Any]:
    """Queue `jobs` jobs at once; their results, in order of submission."""
    ids = [f"bench-{k:04d}" for k in range(jobs)]
    async with serving.redis.pubsub() as completions:
        await completions.subscribe(serving.keys.completions_channel)
        for seed, job_id in enumerate(ids):
            await serving.store.submit(_job(job_id, seed, shape), serving.keys.size_stream(shape.size))
        waiting = set(ids)
        async for message in completions.listen():
            if message["type"] == "message":
                waiting.discard(message["data"].decode())
                if not waiting:
                    break
    return [await serving.store.fetch_meta(job_id) for job_id in ids]


async def measure_cancel(args: argparse.Namespace) -> dict[str, Any]:
    """Cancel a long job after its first progress event and queue a short one at once, `--jobs` times: the
    time from the cancel to the short job's start on the same worker, and the long job's steps after the cancel."""
    from common.protocol import Shape

    shape = Shape.parse(args.shape)
    long_shape = shape.model_copy(update={"steps": args.cancel_steps})
    rounds = []
    async with _serving(args, (long_shape, shape)) as serving:
        async with serving.redis.pubsub() as events:
            await events.subscribe(serving.keys.job_events_channel)
            for k in range(args.jobs):
                rounds.append(await _cancel_round(serving, events, k, long_shape, shape))
    to_free = [r["cancel_to_start_ms"] for r in rounds]
    return {
        "measurement": "cancel_to_free",
        "machine": f"{describe()}, {serving.timed.devices} x {serving.timed.device_kind}",
        "model": args.model,
        "cancelled_shape": str(long_shape),
        "next_shape": str(shape),
        "rounds": len(rounds),
        "cancel_to_next_start_p50_ms": statistics.median(to_free),
        "cancel_to_next_start_max_ms": max(to_free),
        "cancel_to_next_start_p50_steps": statistics.median(r["cancel_to_start_steps"] for r in rounds),
        "step_p50_ms": statistics.median(r["step_ms"] for r in rounds),
        # Steps of the cancelled job: reported before the cancel landed, and finished in all (the step that
        # learnt of the cancel and the one dispatched after it are not counted: they finish, unreported).
        "reported_before_cancel": [r["reported_before_cancel"] for r in rounds],
        "finished_steps": [r["finished_steps"] for r in rounds],
    }


async def _cancel_round(serving: _Serving, events: Any, k: int, long_shape: Shape, shape: Shape) -> dict[str, float]:
    registry = serving.worker.metrics.registry
    long_id, short_id = f"long-{k}", f"short-{k}"
    counted_before = registry.get_sample_value("sdxl_worker_denoising_steps_total") or 0.0
    await serving.store.submit(_job(long_id, k, long_shape), serving.keys.size_stream(long_shape.size))
    await _event(events, long_id, lambda event: event["type"] == "progress")
    cancelled_at = time.perf_counter()
    await serving.store.cancel(long_id)
    record = await serving.store.record(long_id)
    await serving.store.submit(_job(short_id, k, shape), serving.keys.size_stream(shape.size))
    await _event(events, short_id, lambda event: event["type"] == "started")
    started_at = time.perf_counter()
    await _event(events, short_id, lambda event: event["type"] == "progress" and event["step"] == shape.steps)
    step_s = (time.perf_counter() - started_at) / shape.steps  # the next job's, its text encoding included
    counted = (registry.get_sample_value("sdxl_worker_denoising_steps_total") or 0.0) - counted_before
    assert record is not None and record.step is not None, "the cancelled job reported a step"
    return {
        "cancel_to_start_ms": (started_at - cancelled_at) * 1000,
        "cancel_to_start_steps": (started_at - cancelled_at) / step_s,
        "reported_before_cancel": record.step,
        "finished_steps": counted - shape.steps,
        "step_ms": step_s * 1000,
    }


async def _event(events: Any, job_id: str, wanted: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The next event for `job_id` on the job events channel that is `wanted`."""
    async for message in events.listen():
        if message["type"] == "message" and (event := json.loads(message["data"]))["id"] == job_id and wanted(event):
            return cast("dict[str, Any]", event)
    raise RuntimeError("the job events channel closed")


def _report(args: argparse.Namespace, shape: Shape, timed: _Timed, results: list[Any]) -> dict[str, Any]:
    """Gaps after the first job (whose start includes the loop's own warm-up)."""
    spans = timed.spans[-len(results) :]
    gaps_ms = [(nxt[0] - prev[1]) * 1000 for prev, nxt in itertools.pairwise(spans[1:])]
    counted = results[1:]
    generate_s = [end - start for start, end in spans[1:]]
    wall_s = spans[-1][1] - spans[1][0]
    return {
        "measurement": "backtoback",
        "machine": f"{describe()}, {timed.devices} x {timed.device_kind}",
        "model": args.model,
        "shape": str(shape),
        "jobs_counted": len(counted),
        "images": "model output" if not args.noise_images else f"{args.noise_images}x{args.noise_images} noise",
        "statuses": sorted({r.status for r in results}),
        "device_idle_p50_ms": statistics.median(gaps_ms),
        "device_idle_mean_ms": statistics.fmean(gaps_ms),
        "device_idle_max_ms": max(gaps_ms),
        "device_busy_fraction": sum(generate_s) / wall_s,
        "generate_p50_ms": statistics.median(generate_s) * 1000,
        "encode_p50_ms": statistics.median(r.timings.encode_ms for r in counted if r.timings),
        "jobs_per_s": (len(counted) - 1) / (spans[-1][0] - spans[1][0]),
    }


def _text(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)
