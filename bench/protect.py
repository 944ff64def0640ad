"""What protection costs and what it bounds: `sdxl-serve bench protect`.

1. Refusals per second on one core. The gateway runs pinned to one CPU (`taskset`), this load generator and
   Redis on another; N connections send back to back for D seconds:
   - `429`: POST /v1/jobs from an address over its rate limit (one Redis script per request);
   - `400`: POST /v1/jobs with an invalid body, the rate limiter on but never reached (its script, then
     validation);
   - `400, no limiter`: the same with rate limits off (validation alone).
   The gateway's own CPU use over each run is reported beside it: near 100% means the gateway, not the
   client, was the bottleneck.
2. A burst of 10x capacity. With `--max-queue-depth D` and W stand-in workers (each takes S ms per job and
   stores four tiny images, no model), 10 x D clients POST /v1/generate at once, R times. Every answer is
   counted by status; every accepted job must come back with its images, and Redis must hold exactly as
   many jobs as were accepted. The gateway's RSS is sampled before, during (peak) and after each burst.

Starts its own redis-server and gateways; needs Linux (`taskset`, /proc) and two CPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from bench.routing import number_type
from common.protocol import JobResult, Shape, Timings
from common.rediskeys import RedisKeys
from common.registry import Registry, WorkerInfo
from common.streams import JobStreams
from testkit import async_redis_process, free_port, wait_http
from worker.delivery import Delivery

SHAPE = Shape(width=64, height=64, steps=2)
VALID = {"prompt": "a lighthouse at dusk", "num_inference_steps": SHAPE.steps}
INVALID = {"prompt": "a lighthouse at dusk", "colour": "red"}  # an unknown field: 400 extra_forbidden
NO_LIMITS = [arg for name in ("address-submit", "address-read") for arg in (f"--rate-limit-{name}", "off")]
RSS_SAMPLE_S = 0.02
KEYS = RedisKeys()


@dataclass(frozen=True)
class ThroughputRun:
    """One closed-loop run: answers by status, requests per second, and who was busy."""

    name: str
    statuses: dict[str, int]
    seconds: float
    requests_per_s: float
    gateway_cpu_pct: float
    client_cpu_pct: float
    # Gateway CPU time per answer, and the answers per second it implies for one whole core: the figure that
    # holds on a busy machine, where the gateway does not get its core to itself.
    gateway_cpu_us_per_request: float
    one_core_ceiling_per_s: float


@dataclass(frozen=True)
class BurstRun:
    """One burst: answers by status, accepted jobs that came back, and the gateway's RSS around it."""

    clients: int
    statuses: dict[str, int]
    accepted: int
    completed: int
    jobs_in_redis: int
    seconds: float
    rss_before_mib: float
    rss_peak_mib: float
    rss_after_mib: float


@dataclass
class Report:
    machine: str
    gateway_cpu: int
    client_cpu: int
    throughput: list[ThroughputRun] = field(default_factory=list)
    bursts: list[BurstRun] = field(default_factory=list)
    rss_idle_mib: float = 0.0
    max_queue_depth: int = 0
    workers: int = 0
    service_ms: float = 0.0


# --- Processes


def _pinned(cpu: int, argv: Sequence[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *argv]


@asynccontextmanager
async def redis_server(cpu: int) -> AsyncIterator[str]:
    """A private redis-server pinned to `cpu`; yields its URL."""
    async with async_redis_process() as server:
        assert server.pid is not None
        pin(server.pid, cpu)
        yield server.url()


def pin(pid: int, cpu: int) -> None:
    """Keep every thread of process `pid` on `cpu` (what `taskset -a -p` does)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), {cpu})


@asynccontextmanager
async def gateway(redis_url: str, cpu: int, *flags: str) -> AsyncIterator[tuple[str, int]]:
    """A gateway process pinned to `cpu` with `flags`; yields its URL and pid."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "sdxl_serve",
        "--log-level",
        "warning",
        "gateway",
        "--redis-url",
        redis_url,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *flags,
    ]
    process = await asyncio.create_subprocess_exec(
        *_pinned(cpu, argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        await wait_http(f"http://127.0.0.1:{port}/healthz", 60)
        yield f"http://127.0.0.1:{port}", process.pid
    finally:
        process.terminate()
        await process.wait()


def rss_mib(pid: int) -> float:
    """Resident set size of a process, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- Stand-in workers


async def stand_in_workers(redis_url: str, count: int, service_s: float, stop: asyncio.Event) -> None:
    """`count` workers serving SHAPE: each claims a job, waits `service_s`, stores four tiny images."""
    redis = aioredis.Redis.from_url(redis_url)
    try:
        registry = Registry(redis, KEYS)
        infos = [
            WorkerInfo(
                id=f"stand-in-{k}",
                host="bench",
                pid=os.getpid(),
                model="none",
                images_per_request=4,
                state="ready",
                sizes=[SHAPE.size],
                max_steps=SHAPE.steps,
                default_steps=SHAPE.steps,
                started_at=time.time(),
            )
            for k in range(count)
        ]
        for info in infos:
            await JobStreams(redis, KEYS).ensure_group(KEYS.size_stream(SHAPE.size))
            await registry.publish(info, ttl_s=30)
        await asyncio.gather(
            *(_serve(redis, info.id, service_s, stop) for info in infos), _heartbeat(registry, infos, stop)
        )
    finally:
        await redis.aclose()


async def _serve(redis: aioredis.Redis, worker_id: str, service_s: float, stop: asyncio.Event) -> None:
    delivery = Delivery(redis, KEYS)
    while not stop.is_set():
        claimed = await delivery.claim(worker_id, [KEYS.size_stream(SHAPE.size)], block_ms=100)
        if claimed is None:
            continue
        started = await delivery.start(claimed, worker_id)
        await asyncio.sleep(service_s)
        job = claimed.job
        result = JobResult(
            id=job.id,
            status="succeeded",
            worker=worker_id,
            seed=job.params.seed,
            shape=job.params.shape,
            scheduler=job.params.scheduler,
            image_count=4,
            timings=Timings(
                queued_ms=float((started or 0) - claimed.enqueued_ms), generate_ms=service_s * 1000, encode_ms=0.0
            ),
        )
        await delivery.complete(claimed, result, [b"\x89PNG stand-in"] * 4)


async def _heartbeat(registry: Registry, infos: list[WorkerInfo], stop: asyncio.Event) -> None:
    while not stop.is_set():
        await asyncio.sleep(2)
        for info in infos:
            await registry.publish(info, ttl_s=30)


# --- Load


async def closed_loop(
    url: str, body: dict[str, Any], connections: int, duration_s: float
) -> tuple[Counter[str], float]:
    """`connections` clients each POSTing /v1/jobs back to back for `duration_s`; answers by status."""
    statuses: Counter[str] = Counter()
    deadline = time.perf_counter() + duration_s
    payload = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}

    async def client(session: aiohttp.ClientSession) -> None:
        while time.perf_counter() < deadline:
            async with session.post(f"{url}/v1/jobs", data=payload, headers=headers) as response:
                await response.read()
                statuses[str(response.status)] += 1

    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as session:
        await asyncio.gather(*(client(session) for _ in range(connections)))
    return statuses, time.perf_counter() - started


async def measure_throughput(
    name: str, url: str, pid: int, body: dict[str, Any], connections: int, duration_s: float
) -> ThroughputRun:
    await closed_loop(url, body, connections, min(1.0, duration_s))  # warm up connections and caches
    gateway_cpu, client_cpu = cpu_seconds(pid), _own_cpu_s()
    statuses, seconds = await closed_loop(url, body, connections, duration_s)
    gateway_used, client_used = cpu_seconds(pid) - gateway_cpu, _own_cpu_s() - client_cpu
    answered = sum(statuses.values())
    per_request_us = 1e6 * gateway_used / answered if answered else 0.0
    return ThroughputRun(
        name=name,
        statuses=dict(statuses),
        seconds=round(seconds, 2),
        requests_per_s=round(answered / seconds, 1),
        gateway_cpu_pct=round(100 * gateway_used / seconds, 1),
        client_cpu_pct=round(100 * client_used / seconds, 1),
        gateway_cpu_us_per_request=round(per_request_us, 1),
        one_core_ceiling_per_s=round(1e6 / per_request_us) if per_request_us else 0.0,
    )


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def one_burst(url: str, pid: int, redis_url: str, clients: int) -> BurstRun:
    """`clients` concurrent POST /v1/generate; waits for every answer, sampling the gateway's RSS."""
    before = rss_mib(pid)
    peak = [before]
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mib(pid))
            await asyncio.sleep(RSS_SAMPLE_S)

    redis = aioredis.Redis.from_url(redis_url)
    jobs_before = await _job_records(redis)
    sampler = asyncio.create_task(sample())
    started = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        answers = await asyncio.gather(*(_generate(session, url, seed) for seed in range(clients)))
    seconds = time.perf_counter() - started
    done.set()
    await sampler
    await asyncio.sleep(2.0)  # let the gateway settle before "after"
    jobs = await _job_records(redis) - jobs_before
    await redis.aclose()
    statuses = Counter(status for status, _ in answers)  # "200", or "STATUS CODE" for a refusal
    return BurstRun(
        clients=clients,
        statuses=dict(statuses),
        accepted=jobs,
        completed=sum(1 for status, images in answers if status == "200" and images == 4),
        jobs_in_redis=jobs,
        seconds=round(seconds, 2),
        rss_before_mib=round(before, 1),
        rss_peak_mib=round(peak[0], 1),
        rss_after_mib=round(rss_mib(pid), 1),
    )


async def _generate(session: aiohttp.ClientSession, url: str, seed: int) -> tuple[str, int]:
    try:
        async with session.post(f"{url}/v1/generate", json={**VALID, "seed": seed}) as response:
            body = await response.json()
            if response.status == 200:
                return "200", len(body.get("images", []))
            return f"{response.status} {body.get('error', {}).get('code')}", 0
    except (aiohttp.ClientError, TimeoutError) as exc:
        return type(exc).__name__, 0


async def _job_records(redis: aioredis.Redis) -> int:
    return sum([1 async for _ in redis.scan_iter(f"{KEYS.prefix}:job:*", count=1000)])


# --- The run


async def run(args: argparse.Namespace) -> Report:
    os.sched_setaffinity(0, {args.client_cpu})
    report = Report(
        machine=f"{os.uname().nodename} {os.uname().machine}, {os.cpu_count()} CPUs",
        gateway_cpu=args.gateway_cpu,
        client_cpu=args.client_cpu,
        max_queue_depth=args.max_queue_depth,
        workers=args.workers,
        service_ms=args.service_ms,
    )
    async with redis_server(args.client_cpu) as redis_url:
        stop = asyncio.Event()
        workers = asyncio.create_task(stand_in_workers(redis_url, args.workers, args.service_ms / 1000, stop))
        await asyncio.sleep(0.5)
        phases: list[tuple[str, dict[str, Any], list[str]]] = [
            ("429 rate_limited", VALID, ["--rate-limit-address-submit", "1/h:1"]),
            ("400 invalid body", INVALID, ["--rate-limit-address-submit", "1000000/s:1000000"]),
            ("400 invalid body, no limiter", INVALID, NO_LIMITS),
        ]
        for name, body, flags in phases:
            async with gateway(redis_url, args.gateway_cpu, *flags) as (url, pid):
                report.throughput.append(
                    await measure_throughput(name, url, pid, body, args.connections, args.duration)
                )
        flags = [*NO_LIMITS, "--max-queue-depth", str(args.max_queue_depth), "--request-timeout", "600"]
        async with gateway(redis_url, args.gateway_cpu, *flags) as (url, pid):
            await closed_loop(url, VALID, 4, 0.5)  # the idle figure is taken after a first few requests
            await asyncio.sleep(3.0)
            report.rss_idle_mib = round(rss_mib(pid), 1)
            for _ in range(args.bursts):
                report.bursts.append(await one_burst(url, pid, redis_url, args.burst_factor * args.max_queue_depth))
        stop.set()
        await workers
    return report


def render(report: Report) -> str:
    lines = [
        f"machine: {report.machine}; gateway on CPU {report.gateway_cpu}, client and Redis on CPU {report.client_cpu}",
        "",
        f"{'answer':<30} {'req/s':>8} {'gateway CPU':>11} {'client CPU':>10} {'CPU us/req':>10} "
        f"{'1-core req/s':>12}  statuses",
    ]
    for t in report.throughput:
        lines.append(
            f"{t.name:<30} {t.requests_per_s:>8.1f} {t.gateway_cpu_pct:>10.1f}% {t.client_cpu_pct:>9.1f}% "
            f"{t.gateway_cpu_us_per_request:>10.1f} {t.one_core_ceiling_per_s:>12.0f}  {t.statuses}"
        )
    lines += [
        "",
        f"bursts: max queue depth {report.max_queue_depth}, {report.workers} stand-in workers at "
        f"{report.service_ms:g} ms a job; gateway RSS idle {report.rss_idle_mib} MiB",
        f"{'clients':>8} {'statuses':<28} {'accepted':>8} {'completed':>9} {'s':>6} "
        f"{'RSS before':>10} {'peak':>7} {'after':>7} (MiB)",
    ]
    for b in report.bursts:
        lines.append(
            f"{b.clients:>8} {json.dumps(b.statuses):<28} {b.accepted:>8} {b.completed:>9} {b.seconds:>6} "
            f"{b.rss_before_mib:>10} {b.rss_peak_mib:>7} {b.rss_after_mib:>7}"
        )
    return "\n".join(lines)


_positive = number_type(float, 0)
_positive_int = number_type(int, 0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare this benchmark's flags."""
    parser.add_argument("--duration", type=_positive, default=10.0, help="seconds of each refusal run")
    parser.add_argument("--connections", type=_positive_int, default=32, help="clients of each refusal run")
    parser.add_argument("--max-queue-depth", type=_positive_int, default=100, help="the gateway's, for the bursts")
    parser.add_argument("--burst-factor", type=_positive_int, default=10, help="burst clients per queue place")
    parser.add_argument("--bursts", type=_positive_int, default=3)
    parser.add_argument("--workers", type=_positive_int, default=2, help="stand-in workers")
    parser.add_argument("--service-ms", type=_positive, default=50.0, help="each stand-in job's duration")
    parser.add_argument("--gateway-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1, help="this load generator's and Redis's CPU")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")


def main(args: argparse.Namespace) -> int:
    """Run the benchmark; 1 if an accepted job did not come back, else 0."""
    if shutil.which("taskset") is None:
        print("bench protect: needs taskset (util-linux)", file=sys.stderr)
        return 2
    report = asyncio.run(run(args))
    print(json.dumps(asdict(report), indent=2) if args.json else render(report))
    lost = [b for b in report.bursts if b.completed != b.accepted or b.jobs_in_redis != b.accepted]
    return 1 if lost else 0
