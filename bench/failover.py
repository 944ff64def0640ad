"""A Sentinel failover under submit load: how long Redis is away, and how many accepted jobs are lost.

Starts a primary, a replica and three sentinels (testkit/sentinel.py, down-after 1 s), submits jobs through
the Sentinel URL from two concurrent submitters as the gateway does (`JobStore.submit`, with
`--durable-accept` off or replica), SIGKILLs the primary after some acceptances, and brings it back as a
replica once the sentinels have promoted the old one. Then it counts the accepted jobs whose record is not
on the new master: lost. Two scenarios: the replica keeps up (loopback replication), and the replica is
300 ms behind when the primary dies (it replicates through a relay that holds the primary's stream back for
that long, then is cut with the primary: the window a slow link or a busy replica opens).

Recovery is the time from the kill to the answer of the first accepted submit sent after it (with durable
acceptance, that waits for the rejoined replica too); the switch is the time to the sentinels'
`+switch-master`.

    .venv/bin/python bench/failover.py [--trials 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.host import describe
from common.jobstore import DurableAccept, JobStore, NotDurable
from common.protocol import Shape
from common.redis_conn import UNAVAILABLE, connect
from common.rediskeys import RedisKeys
from testkit.jobs import make_job
from testkit.sentinel import SentinelGroup, start_sentinel_group

SHAPE = Shape(width=1024, height=1024, steps=20)
BEFORE_KILL = 200  # acceptances before the kill
LAG_S = 0.3


@dataclass
class Load:
    # job id, monotonic times of the submit and of its answer
    accepted: list[tuple[str, float, float]] = field(default_factory=list)
    refused: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def until(self, done: Callable[[], bool]) -> None:
        while not done():
            self.changed.clear()
            await self.changed.wait()


async def submitter(store: JobStore, load: Load, stop: asyncio.Event) -> None:
    stream = RedisKeys().size_stream(SHAPE.size)
    for _ in itertools.count():
        if stop.is_set():
            return
        job = make_job(uuid.uuid4().hex, SHAPE, prompt="fox", result_ttl_s=600)
        sent = time.monotonic()
        try:
            await store.submit(job, stream)
        except (*UNAVAILABLE, NotDurable, OSError):
            load.refused += 1
            await asyncio.sleep(0.05)
            continue
        load.accepted.append((job.id, sent, time.monotonic()))
        load.changed.set()


async def trial(mode: DurableAccept, lagging: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="sdxl-bench-failover-") as scratch:
        group = await start_sentinel_group(Path(scratch), relayed=lagging)
        client = connect(group.url(), name="bench-failover")
        try:
            return await _run(group, JobStore(client, RedisKeys(), mode, durable_timeout_ms=500), mode, lagging)
        finally:
            await client.aclose()
            await group.close()


async def _run(group: SentinelGroup, store: JobStore, mode: str, lagging: bool) -> dict[str, Any]:
    load, stop = Load(), asyncio.Event()
    tasks = [asyncio.create_task(submitter(store, load, stop)) for _ in range(2)]
    await load.until(lambda: len(load.accepted) >= BEFORE_KILL)
    if lagging:  # the replica gets nothing for LAG_S while the primary keeps accepting, then the primary dies
        await group.hold_replica()
        await asyncio.sleep(LAG_S)
    await group.kill_primary()
    killed = group.killed_at
    assert killed is not None
    if group.link is not None:
        group.link.cut()  # what it held back dies with the primary
    await group.switched()
    switched = time.monotonic() - killed
    await group.rejoin()
    async with asyncio.timeout(60):
        await load.until(lambda: load.accepted[-1][1] > killed)
    recovered = min(answered for _, sent, answered in load.accepted if sent > killed) - killed
    stop.set()
    await asyncio.gather(*tasks)
    lost = await _lost(store, [job_id for job_id, _, _ in load.accepted])
    return {"mode": mode, "replica": "300 ms behind" if lagging else "in step", "accepted": len(load.accepted),
            "lost": lost, "switch_s": switched, "recovered_s": recovered, "refused": load.refused}  # fmt: skip


async def _lost(store: JobStore, job_ids: list[str]) -> int:
    return sum([await store.record(job_id) is None for job_id in job_ids])


async def run(trials: int) -> list[dict[str, Any]]:
    rows = []
    for lagging in (False, True):
        for mode in ("off", "replica"):
            for _ in range(trials):
                rows.append(await trial(mode, lagging))
    return rows


def report(rows: list[dict[str, Any]], trials: int) -> None:
    print(f"bench/failover.py --trials {trials} on {describe()}")
    print("| replica | --durable-accept | accepted (all trials) | accepted jobs lost | switch p50 s | "
          "recovered p50 s |")  # fmt: skip
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for (replica, mode), group in itertools.groupby(rows, key=lambda r: (r["replica"], r["mode"])):
        done = list(group)
        print(f"| {replica} | {mode} | {sum(r['accepted'] for r in done)} | {sum(r['lost'] for r in done)} | "
              f"{statistics.median(r['switch_s'] for r in done):.2f} | "
              f"{statistics.median(r['recovered_s'] for r in done):.2f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = asyncio.run(run(args.trials))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        report(rows, args.trials)


if __name__ == "__main__":
    main()
