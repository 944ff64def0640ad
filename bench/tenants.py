"""What fair share buys a second caller while a first floods: `sdxl-serve bench tenants`.

A gateway with two API keys (rate limits off, so only the queue and the per-caller cap stand in the way),
W stand-in workers (each takes S ms per job and stores four tiny images, no model), and two callers:

- the flooder keeps F requests to `/v1/generate` open at once, sending the next as soon as one is answered
  (a refusal is retried after 50 ms, ignoring Retry-After, as an abusive client would);
- the second caller sends N requests to `/v1/generate` one after another, and on a 429 waits the
  Retry-After it is told and tries again, as a well-behaved client does.

The second caller's wait, from its first attempt until its images arrive (retries included), is reported
as p50 and p99, with and without the per-caller cap (`--max-jobs-in-flight-per-caller`). Starts its own
redis-server and gateways; needs Linux (`taskset`) and two CPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

from bench.protect import VALID, add_stand_in_arguments, gateway, stand_in_cluster
from bench.routing import number_type, percentile
from common.apikeys import digest, new_key

FLOOD_RETRY_S = 0.05


@dataclass(frozen=True)
class Run:
    """One setting of the cap: the second caller's waits and both callers' answers."""

    cap: int
    waits_s: list[float]
    p50_s: float
    p99_s: float
    second_statuses: dict[str, int]
    flooder_statuses: dict[str, int]


@dataclass
class Report:
    machine: str
    max_queue_depth: int
    workers: int
    service_ms: float
    flood: int
    requests: int
    runs: list[Run] = field(default_factory=list)


async def _generate(session: aiohttp.ClientSession, url: str, key: str) -> tuple[str, float]:
    """One POST /v1/generate: its status (with the error code), and the Retry-After of a 429."""
    async with session.post(f"{url}/v1/generate", json=VALID, headers={"Authorization": f"Bearer {key}"}) as response:
        body = await response.json()
        if response.status == 200:
            return "200", 0.0
        return f"{response.status} {body['error']['code']}", float(response.headers.get("Retry-After", "1"))


async def _flood(url: str, key: str, connections: int, stop: asyncio.Event, statuses: Counter[str]) -> None:
    async def one(session: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            status, _ = await _generate(session, url, key)
            statuses[status] += 1
            if status != "200":
                await asyncio.sleep(FLOOD_RETRY_S)

    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        await asyncio.gather(*(one(session) for _ in range(connections)))


async def _second_caller(url: str, key: str, requests: int, statuses: Counter[str]) -> list[float]:
    waits = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        for _ in range(requests):
            started = time.perf_counter()
            while True:
                status, retry_after = await _generate(session, url, key)
                statuses[status] += 1
                if status == "200":
                    break
                await asyncio.sleep(retry_after)
            waits.append(time.perf_counter() - started)
    return waits


async def one_run(
    args: argparse.Namespace, redis_url: str, keys_file: Path, flooder: str, second: str, cap: int
) -> Run:
    flags = [
        "--api-keys-file",
        str(keys_file),
        "--rate-limit-key-submit",
        "off",
        "--rate-limit-key-read",
        "off",
        "--max-queue-depth",
        str(args.max_queue_depth),
        "--max-jobs-in-flight-per-caller",
        str(cap),
        "--request-timeout",
        "600",
    ]
    flooded: Counter[str] = Counter()
    answered: Counter[str] = Counter()
    async with gateway(redis_url, args.gateway_cpu, *flags) as (url, _):
        stop = asyncio.Event()
        flood = asyncio.create_task(_flood(url, flooder, args.flood, stop, flooded))
        await asyncio.sleep(args.warmup)  # the flood fills what it may before the second caller comes
        waits = await _second_caller(url, second, args.requests, answered)
        stop.set()
        await flood
    ordered = sorted(waits)
    return Run(
        cap=cap,
        waits_s=[round(w, 3) for w in waits],
        p50_s=round(percentile(ordered, 0.5), 3),
        p99_s=round(percentile(ordered, 0.99), 3),
        second_statuses=dict(answered),
        flooder_statuses=dict(flooded),
    )


async def run(args: argparse.Namespace) -> Report:
    os.sched_setaffinity(0, {args.client_cpu})
    report = Report(
        machine=f"{os.uname().nodename} {os.uname().machine}, {os.cpu_count()} CPUs",
        max_queue_depth=args.max_queue_depth,
        workers=args.workers,
        service_ms=args.service_ms,
        flood=args.flood,
        requests=args.requests,
    )
    flooder, second = new_key(), new_key()
    with tempfile.TemporaryDirectory(prefix="sdxl-bench-tenants-") as scratch:
        keys_file = Path(scratch) / "keys"
        keys_file.write_text(f"{digest(flooder)}  # flooder\n{digest(second)}  # second caller\n")
        async with stand_in_cluster(args) as redis_url:
            for cap in (0, args.cap):
                report.runs.append(await one_run(args, redis_url, keys_file, flooder, second, cap))
    return report


def render(report: Report) -> str:
    lines = [
        f"machine: {report.machine}",
        f"max queue depth {report.max_queue_depth}, {report.workers} stand-in workers at {report.service_ms:g} ms "
        f"a job; the flooder keeps {report.flood} requests open, the second caller sends {report.requests}",
        "",
        f"{'cap per caller':>14} {'p50 wait s':>10} {'p99 wait s':>10}  second caller's answers; flooder's answers",
    ]
    for r in report.runs:
        cap = str(r.cap) if r.cap else "off"
        lines.append(
            f"{cap:>14} {r.p50_s:>10.3f} {r.p99_s:>10.3f}  {json.dumps(r.second_statuses)}; "
            f"{json.dumps(r.flooder_statuses)}"
        )
    return "\n".join(lines)


_positive = number_type(float, 0)
_positive_int = number_type(int, 0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare this benchmark's flags."""
    parser.add_argument("--max-queue-depth", type=_positive_int, default=100, help="the gateway's")
    parser.add_argument(
        "--cap", type=_positive_int, default=20, help="--max-jobs-in-flight-per-caller of the run with it"
    )
    parser.add_argument("--flood", type=_positive_int, default=64, help="requests the flooder keeps open")
    parser.add_argument("--requests", type=_positive_int, default=20, help="the second caller's requests")
    parser.add_argument("--warmup", type=_positive, default=2.0, help="seconds of flood before the second caller")
    add_stand_in_arguments(parser)


def main(args: argparse.Namespace) -> int:
    """Run the benchmark; 0 when the second caller was served every time."""
    if shutil.which("taskset") is None:
        print("bench tenants: needs taskset (util-linux)", file=sys.stderr)
        return 2
    report = asyncio.run(run(args))
    print(json.dumps(asdict(report), indent=2) if args.json else render(report))
    return 0 if all(len(r.waits_s) == report.requests for r in report.runs) else 1
