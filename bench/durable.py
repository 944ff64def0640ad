"""What durable acceptance costs: submits per second with `--durable-accept off` and `replica`, alternating.

Starts a primary and a replica on loopback (testkit/sentinel.py; the sentinels only watch), then for each
round runs `--concurrency` submitters against the primary for `--seconds` in each of three ways, each
submitter sending jobs one after another as the gateway does (`JobStore.submit` with an idempotency key):
`off`; `replica`, the gateway's group commit (concurrent submits share one WAIT); and `replica, WAIT per
submit`, durable acceptance as it was before group commit (each submit's script and its own WAIT in one
pipeline), kept here to measure the difference. The three alternate within every round, so all see the
same machine; the database is flushed between runs. `submits per WAIT` is from the server's own counts of
EVALSHA and WAIT.

    .venv/bin/python bench/durable.py [--rounds 5] [--seconds 3] [--concurrency 2 16 64] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis.asyncio as aioredis

from bench.host import describe
from common.jobstore import JobStore, NotDurable
from common.protocol import Shape
from common.redis_conn import connect
from common.rediskeys import RedisKeys
from testkit.jobs import make_job
from testkit.sentinel import start_sentinel_group

SHAPE = Shape(width=1024, height=1024, steps=20)
MODES = ("off", "replica", "replica, WAIT per submit")
TIMEOUT_MS = 1000


class WaitPerSubmit(JobStore):
    """Durable acceptance before group commit: every submit sends its script and its own WAIT, pipelined."""

    async def _submit_durably(self, job_id: str, keys: list[str], args: list[Any]) -> list[Any]:
        async with self._redis.pipeline(transaction=False) as pipe:
            await self._submit(keys=keys, args=args, client=pipe)
            pipe.execute_command("WAIT", 1, TIMEOUT_MS)
            reply, confirmed = await pipe.execute()
        if confirmed < 1:
            raise NotDurable(job_id, "replica", TIMEOUT_MS)
        result: list[Any] = reply
        return result


def store_for(client: aioredis.Redis, mode: str) -> JobStore:
    if mode == "off":
        return JobStore(client, RedisKeys())
    kind = JobStore if mode == "replica" else WaitPerSubmit
    return kind(client, RedisKeys(), "replica", durable_timeout_ms=TIMEOUT_MS)


async def submitter(store: JobStore, stream: str, deadline: float) -> int:
    """Submit jobs one after another until `deadline`; how many were accepted."""
    accepted = 0
    while time.monotonic() < deadline:
        job = make_job(uuid.uuid4().hex, SHAPE, prompt="fox", result_ttl_s=600)
        await store.submit(job, stream, idempotency_key=job.id)
        accepted += 1
    return accepted


async def one_run(client: aioredis.Redis, mode: str, concurrency: int, seconds: float) -> dict[str, Any]:
    """`concurrency` submitters for `seconds` in `mode`: submits per second, and per WAIT."""
    await client.flushall()
    await client.config_resetstat()
    store = store_for(client, mode)
    stream = RedisKeys().size_stream(SHAPE.size)
    started = time.monotonic()
    counts = await asyncio.gather(*(submitter(store, stream, started + seconds) for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    stats = await client.info("commandstats")
    waits = int(stats.get("cmdstat_wait", {}).get("calls", 0))
    scripts = int(stats.get("cmdstat_evalsha", {}).get("calls", 0))
    return {"mode": mode, "concurrency": concurrency, "per_s": sum(counts) / elapsed,
            "per_wait": scripts / waits if waits else None}  # fmt: skip


async def run(rounds: int, seconds: float, levels: list[int]) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="sdxl-bench-durable-") as scratch:
        group = await start_sentinel_group(Path(scratch))
        client = connect(group.primary.url(), name="bench-durable")
        try:
            for n in range(rounds):
                for concurrency in levels:
                    for mode in MODES[n % len(MODES) :] + MODES[: n % len(MODES)]:  # each goes first in turn
                        rows.append(await one_run(client, mode, concurrency, seconds))
        finally:
            await client.aclose()
            await group.close()
    return rows


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"bench/durable.py --rounds {args.rounds} --seconds {args.seconds} on {describe()}")
    print("| submitters | --durable-accept | submits/s (median) | of `off` (median of rounds) | submits per WAIT |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for concurrency in args.concurrency:
        off = [r for r in rows if r["concurrency"] == concurrency and r["mode"] == "off"]
        for mode in MODES:
            runs = [r for r in rows if r["concurrency"] == concurrency and r["mode"] == mode]
            ratio = statistics.median(r["per_s"] / o["per_s"] for r, o in zip(runs, off, strict=True))
            per_wait = "" if mode == "off" else f"{statistics.median(r['per_wait'] for r in runs):.1f}"
            print(f"| {concurrency} | {mode} | {statistics.median(r['per_s'] for r in runs):.0f} | {ratio:.2f} | "
                  f"{per_wait} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[2, 16, 64])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = asyncio.run(run(args.rounds, args.seconds, args.concurrency))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        report(rows, args)


if __name__ == "__main__":
    main()
