"""What live step progress costs, and how soon a client sees it.

Cost: the worker's own pipeline, in this process, compiled twice for one shape (with progress: one
dispatch per denoising step, each reported; without: the whole loop in one executable) and run
alternately, so both see the same machine state:

    sdxl-serve bench progress --model DIR --shape 64x64x20 --repeats 20

Latency: against a running gateway with an idle, warm worker, sequential jobs through `POST /v1/jobs`
and the event stream; the time from sending the submit to the first `progress` event (and to `started`):

    sdxl-serve bench progress --url http://127.0.0.1:8000 --requests 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import aiohttp

from bench.host import describe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="hub id or local diffusers directory: measure progress's cost")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--shape", default="64x64x20", help="WIDTHxHEIGHTxSTEPS")
    parser.add_argument("--repeats", type=int, default=20, help="generations per variant")
    parser.add_argument("--cpu-devices", type=int, default=4)
    parser.add_argument("--url", help="gateway URL: measure submit-to-first-progress")
    parser.add_argument("--requests", type=int, default=20, help="sequential jobs for --url")
    parser.add_argument("--steps", type=int, default=None, help="num_inference_steps for --url jobs")
    parser.add_argument("--json", action="store_true", help="one JSON object per measurement")


def main(args: argparse.Namespace) -> int:
    if not args.model and not args.url:
        raise SystemExit("sdxl-serve bench progress: give --model (cost), --url (latency) or both")
    reports = []
    if args.model:
        reports.append(measure_cost(args))
    if args.url:
        reports.append(asyncio.run(measure_latency(args.url, args.requests, args.steps)))
    for report in reports:
        print(json.dumps(report) if args.json else _table(report))
    return 0


def measure_cost(args: argparse.Namespace) -> dict[str, Any]:
    """Median generation time with and without per-step progress, alternating runs."""
    from worker.cli import use_cpu_devices

    use_cpu_devices(args.cpu_devices)
    from common.protocol import GenerationParams, Shape
    from worker.pipeline import PipelineOptions, SDXLPipeline

    shape = Shape.parse(args.shape)
    with_progress = SDXLPipeline.load(
        args.model, args.revision, PipelineOptions(images_per_request=4, report_progress=True)
    )
    without = with_progress.variant(report_progress=False)
    for pipeline in (with_progress, without):
        pipeline.compile(shape.size)
    times: dict[str, list[float]] = {"with": [], "without": []}
    steps_seen: list[int] = []
    request = GenerationParams(prompt="a lighthouse at dusk", guidance_scale=7.5)
    for k in range(args.repeats):
        for name, pipeline in (("with", with_progress), ("without", without)):
            started = time.perf_counter()
            pipeline.generate(request.resolved(shape, seed=k), on_step=steps_seen.append)
            times[name].append(time.perf_counter() - started)
    with_s, without_s = statistics.median(times["with"]), statistics.median(times["without"])
    return {
        **_work_per_step(with_progress, without, shape.size),
        "measurement": "progress_cost",
        "machine": f"{describe()}, {with_progress.devices} x {with_progress.device_kind}",
        "model": args.model,
        "shape": str(shape),
        "repeats": args.repeats,
        "with_progress_median_s": with_s,
        "without_progress_median_s": without_s,
        "overhead_pct": 100 * (with_s - without_s) / without_s,
        "per_step_overhead_ms": 1000 * (with_s - without_s) / shape.steps,
        "reports_per_generation": len(steps_seen) / args.repeats,
    }


def _work_per_step(stepwise: Any, fused: Any, size: Any) -> dict[str, float]:
    """What XLA counts (per device) for the stepwise step and for the fused loop's body (the fused executable less
    begin and finish): the same work when the step recomputes nothing the loop computes once."""
    costs = {**stepwise.executable_costs(size), **fused.executable_costs(size)}
    body = {key: costs["fused"][key] - costs["begin"][key] - costs["finish"][key] for key in costs["step"]}
    return {
        "step_gflop": costs["step"]["flops"] / 1e9,
        "fused_body_gflop": body["flops"] / 1e9,
        "step_gb_accessed": costs["step"]["bytes accessed"] / 1e9,
        "fused_body_gb_accessed": body["bytes accessed"] / 1e9,
    }


async def measure_latency(url: str, requests: int, steps: int | None) -> dict[str, Any]:
    """Submit-to-`started` and submit-to-first-`progress`, one job at a time."""
    from bench.quantiles import percentile  # nearest rank, as the other serving benchmarks report

    started_ms: list[float] = []
    progress_ms: list[float] = []
    body: dict[str, Any] = {"prompt": "a lighthouse at dusk"}
    if steps is not None:
        body["num_inference_steps"] = steps
    async with aiohttp.ClientSession(base_url=url) as session:
        for seed in range(requests):
            sent = time.perf_counter()
            async with session.post("/v1/jobs", json={**body, "seed": seed}) as response:
                accepted = await response.json()
                if response.status != 202:
                    raise SystemExit(f"submit failed: {response.status} {accepted}")
            async with session.get(accepted["events_url"]) as events:
                marks = await _first_marks(events)
            started_ms.append((marks["started"] - sent) * 1000)
            progress_ms.append((marks["progress"] - sent) * 1000)
    return {
        "measurement": "submit_to_first_progress",
        "url": url,
        "requests": requests,
        "started_p50_ms": statistics.median(started_ms),
        "progress_p50_ms": statistics.median(progress_ms),
        "progress_p90_ms": percentile(progress_ms, 0.9),
        "progress_max_ms": max(progress_ms),
    }


async def _first_marks(events: aiohttp.ClientResponse) -> dict[str, float]:
    """When `started` and the first `progress` arrived; reads the stream to its end."""
    marks: dict[str, float] = {}
    async for raw in events.content:
        line = raw.decode().strip()
        if line.startswith("event:"):
            name = line.partition(":")[2].strip()
            marks.setdefault(name, time.perf_counter())
            if name in ("failed", "cancelled"):
                raise SystemExit(f"a job {name}")
    return marks


def _table(report: dict[str, Any]) -> str:
    width = max(map(len, report))
    return "\n".join(
        f"{key:<{width}}  {value:.3f}" if isinstance(value, float) else f"{key:<{width}}  {value}"
        for key, value in report.items()
    )
