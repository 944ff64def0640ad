"""Chaos: N requests while workers are SIGKILLed at random and replaced; nothing may be lost.

Starts its own redis-server (AOF on), a gateway and W workers (tiny model, 2 s heartbeat TTL), sends the
requests with bounded concurrency while a chaos loop kills a random serving worker every few seconds
(never the last one serving) and starts a replacement. Then it checks every request was answered with
images, that every job's stored result is the one its client got, and reports re-executions, duplicate
results dropped, and the time from each kill to its job being taken over.

    .venv/bin/python bench/chaos.py --requests 100 [--workers 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import itertools
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.rediskeys import RedisKeys
from common.registry import SERVING_STATES, Registry
from common.streams import JobStreams
from testkit import (
    ProcessGroup,
    RedisOptions,
    RedisProcess,
    free_port,
    gateway_args,
    wait_http,
    worker_args,
    write_tiny_model,
)

KEYS = RedisKeys()
STEPS = 8
READY_TIMEOUT_S = 300.0


@dataclass
class ChaosReport:
    requests: int
    answered_ok: int = 0
    not_ok: list[str] = field(default_factory=list)
    inconsistent: list[str] = field(default_factory=list)
    kills: int = 0
    jobs_run_more_than_once: int = 0
    duplicate_results_dropped: int = 0
    takeover_ms: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def lost(self) -> int:
        return self.requests - self.answered_ok


class Chaos:
    """The processes of one chaos run."""

    def __init__(self, model: Path, workers: int, log_dir: Path, seed: int) -> None:
        self.model, self.workers = model, workers
        self.rng = random.Random(seed)
        self.scratch = Path(tempfile.mkdtemp(prefix="sdxl-chaos-"))
        self.redis = RedisProcess(self.scratch, RedisOptions(appendonly=True))
        self.redis_url = self.redis.url()
        self.gateway_url = f"http://127.0.0.1:{free_port()}"
        self.group = ProcessGroup(log_dir)
        self.kills: list[tuple[str, float]] = []
        self._serial = 0

    def start(self) -> None:
        self.redis.start()
        port = self.gateway_url.rsplit(":", 1)[1]
        self.group.start("gateway", *gateway_args(self.redis_url, int(port)))
        for _ in range(self.workers):
            self.start_worker()

    def start_worker(self) -> None:
        self._serial += 1
        name = f"chaos-worker-{self._serial}"
        self.group.start(name, *worker_args(self.redis_url, self.model, name, "--heartbeat-ttl", "2", max_steps=STEPS))

    async def monkey(self, registry: Registry, done: asyncio.Event, interval: tuple[float, float]) -> None:
        """Kill a random serving worker every few seconds, never the last one serving; replace it."""
        while not done.is_set():
            try:
                await asyncio.wait_for(done.wait(), self.rng.uniform(*interval))  # the chaos schedule
            except TimeoutError:
                serving = [w.id for w in await registry.workers() if w.state in SERVING_STATES]
                if len(serving) >= 2:
                    victim = self.rng.choice(serving)
                    self.group.processes[victim].kill()
                    self.kills.append((victim, time.time() * 1000))
                    self.start_worker()

    def stop(self) -> None:
        self.group.stop_all()
        self.redis.stop()
        shutil.rmtree(self.scratch, ignore_errors=True)


def digest(images: list[str]) -> str:
    """One digest of a response's base64 images, to compare what a client got with what is stored."""
    return hashlib.sha256("".join(images).encode()).hexdigest()


async def stored_digest(session: aiohttp.ClientSession, gateway_url: str, job_id: str) -> tuple[str, str]:
    """The worker and image digest of a job's stored result, read back through the job API."""
    async with session.get(f"{gateway_url}/v1/jobs/{job_id}") as response:
        result = (await response.json())["result"]
    images = []
    for url in result["images"]:
        async with session.get(f"{gateway_url}{url}") as image:
            images.append(base64.b64encode(await image.read()).decode("ascii"))
    return result["worker"], digest(images)


async def _request(session: aiohttp.ClientSession, url: str, seed: int, gate: asyncio.Semaphore) -> dict[str, Any]:
    async with (
        gate,
        session.post(
            f"{url}/v1/generate", json={"prompt": "chaos", "seed": seed, "num_inference_steps": STEPS}
        ) as response,
    ):
        body: dict[str, Any] = await response.json()
        return {"status": response.status, "body": body}


async def run_chaos(
    model: Path,
    requests: int = 100,
    workers: int = 3,
    concurrency: int = 6,
    kill_every: tuple[float, float] = (2.0, 5.0),
    seed: int = 0,
    log_dir: Path | None = None,
) -> ChaosReport:
    """Run the chaos scenario and return what happened; raises nothing for lost jobs (the caller judges)."""
    chaos = Chaos(model, workers, log_dir or Path(tempfile.mkdtemp(prefix="sdxl-chaos-logs-")), seed)
    report = ChaosReport(requests=requests)
    chaos.start()
    try:
        await wait_http(f"{chaos.gateway_url}/healthz", READY_TIMEOUT_S)
        client = aioredis.Redis.from_url(chaos.redis_url)
        registry = Registry(client, KEYS)
        await registry.wait_for_ready(workers, READY_TIMEOUT_S)
        started = time.perf_counter()
        done = asyncio.Event()
        monkey = asyncio.create_task(chaos.monkey(registry, done, kill_every))
        gate = asyncio.Semaphore(concurrency)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
            answers = await asyncio.gather(*(_request(session, chaos.gateway_url, s, gate) for s in range(requests)))
            done.set()
            await monkey
            report.elapsed_s = time.perf_counter() - started
            await _judge(report, answers, session, chaos, client)
        await client.aclose()
    finally:
        chaos.stop()
    return report


async def _judge(
    report: ChaosReport,
    answers: list[dict[str, Any]],
    session: aiohttp.ClientSession,
    chaos: Chaos,
    client: aioredis.Redis,
) -> None:
    attempts_by_job: dict[str, list[tuple[str, float]]] = {}
    for answer in answers:
        body = answer["body"]
        if answer["status"] != 200:
            report.not_ok.append(f"{answer['status']}: {json.dumps(body)[:200]}")
            continue
        report.answered_ok += 1
        if await stored_digest(session, chaos.gateway_url, body["id"]) != (body["worker"], digest(body["images"])):
            report.inconsistent.append(body["id"])
        raw = await client.lrange(KEYS.attempts(body["id"]), 0, -1)
        texts = [r.decode() if isinstance(r, bytes) else r for r in raw]
        attempts_by_job[body["id"]] = [(a.split("@")[0], float(a.split("@")[1])) for a in texts]
    report.kills = len(chaos.kills)
    report.jobs_run_more_than_once = sum(len(a) > 1 for a in attempts_by_job.values())
    report.duplicate_results_dropped = (await JobStreams(client, KEYS).counters()).get("duplicate_results", 0)
    report.takeover_ms = _takeovers(chaos.kills, attempts_by_job)


def _takeovers(kills: list[tuple[str, float]], attempts: dict[str, list[tuple[str, float]]]) -> list[float]:
    """For each job a killed worker was running, the time from the kill to the next worker's start."""
    delays = []
    for victim, killed_ms in kills:
        for history in attempts.values():
            for (worker, _), (_, next_ms) in itertools.pairwise(history):
                if worker == victim:
                    delays.append(next_ms - killed_ms)
    return delays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", type=Path, default=None, help="default: a tiny model made for the run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    model = args.model
    if model is None:
        model = write_tiny_model(Path(tempfile.mkdtemp(prefix="sdxl-chaos-model-")) / "tiny")
    report = asyncio.run(run_chaos(model, args.requests, args.workers, args.concurrency, seed=args.seed))
    summary = {
        **asdict(report),
        "lost": report.lost,
        "takeover_ms_p50": statistics.median(report.takeover_ms) if report.takeover_ms else None,
        "takeover_ms_max": max(report.takeover_ms, default=None),
    }
    print(json.dumps(summary, indent=2 if args.json else None))


if __name__ == "__main__":
    main()
