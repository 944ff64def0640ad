"""The fault injector, end to end: a cluster, clients, a seeded fault schedule, then the checker.

    report = await run_nemesis(NemesisConfig(seed=7, duration_s=60, work_dir=Path("/tmp/nemesis")))
    print(render(report))

Phases, with their bounds:
1. start the cluster and wait until it is ready (`ready_timeout_s`);
2. clients send requests while the faults of the schedule are injected (`duration_s`, plus the last
   faults' own durations);
3. the faults stop; clients finish what they had in flight (bounded by their attempts and timeouts);
4. the poller reads every job without a terminal answer until the cluster is quiet (every accepted job
   resolved, nothing pending, queue depth 0, no webhook message due) or `quiet_bound_s` has passed since
   the last fault ended;
5. every job is read once more, every gateway must serve a new request, and the checker judges: with
   `webhooks`, every request asks for its job's `completed` webhook, sent to a receiver that
   answers 503 to a fifth of the attempts, and every job seen ended must have reached it, also when
   `differing_webhook_gateways` gateways that lack the signing secret or the allow-list take messages too.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

from common.apikeys import new_webhook_secret
from common.registry import Registry
from common.streams import JobStreams
from testkit.checker import TERMINAL, ClusterState, History, Rollback, Verdict, check, webhooks_missing
from testkit.clients import Clients, LoadConfig
from testkit.cluster import ClusterConfig, NemesisCluster
from testkit.faults import FaultRunner
from testkit.receiver import SLOW, Receiver
from testkit.schedule import REQUESTABLE, Fault, FaultKind, Targets, make_schedule

logger = logging.getLogger(__name__)

QUIET_POLL_S = 0.5
MAX_ASKED_AGAIN = 3  # a request whose job vanished is submitted again at most this often
PROBE_ATTEMPTS = 3


def default_counts(each: int = 2) -> dict[FaultKind, int]:
    """`each` faults of every kind."""
    return dict.fromkeys(REQUESTABLE, each)


@dataclass(frozen=True)
class NemesisConfig:
    """One run: the cluster, the load, the schedule's seed, length and mix, and the quiet bound."""

    work_dir: Path
    seed: int = 0
    duration_s: float = 60.0
    counts: dict[FaultKind, int] = field(default_factory=default_counts)
    cluster: dict[str, Any] = field(default_factory=dict)  # ClusterConfig fields over the defaults
    load: LoadConfig = field(default_factory=LoadConfig)
    quiet_bound_s: float = 60.0  # from the end of the last fault to a quiet cluster
    webhooks: bool = False  # every request asks for a webhook; the checker looks for each ended job's
    # With webhooks, gateways beyond the clients' whose webhook configuration differs (ClusterConfig).
    differing_webhook_gateways: int = 0


@dataclass
class NemesisReport:
    """What was injected (and when), what the clients saw, and the verdict."""

    seed: int
    duration_s: float
    schedule: list[dict[str, Any]]
    injected: list[dict[str, Any]]
    rollbacks: list[Rollback]  # as the checker judged them: snapshot taken, old server stopped, restored
    verdict: Verdict
    quiet_after_last_fault_s: float | None  # None: not quiet within the bound
    quiet_bound_s: float
    proxies: dict[str, dict[str, int]]
    logs: str
    most_rows_held: int = 0  # the most rows one worker held at once (its registry entry, sampled during the faults)

    def to_json(self) -> dict[str, Any]:
        body = dataclasses.asdict(self)
        body["verdict"] = self.verdict.to_json()
        return body


async def run_nemesis(config: NemesisConfig) -> NemesisReport:
    """Run the whole scenario; the verdict says whether the promise held (nothing is raised for a violation)."""
    receiver = await Receiver(answers=_flaky(config.seed)).start() if config.webhooks else None
    secret = new_webhook_secret() if receiver is not None else None
    if receiver is not None:
        config = dataclasses.replace(config, load=dataclasses.replace(config.load, webhook_url=receiver.url))
    cluster_config = ClusterConfig(
        work_dir=config.work_dir,
        request_timeout_s=config.load.request_timeout_s,
        webhook_secret=secret,
        differing_webhook_gateways=config.differing_webhook_gateways if config.webhooks else 0,
        **config.cluster,
    )
    cluster = NemesisCluster(cluster_config)
    try:
        await cluster.start()
        return await _run(config, cluster, receiver)
    finally:
        await cluster.close()
        if receiver is not None:
            await receiver.close()


def _flaky(seed: int, count: int = 100_000) -> list[int | tuple[int, dict[str, str]]]:
    """A receiver's answers: 503 to about a fifth of the attempts (retried), a slow 200 to a fifth (a gateway
    killed meanwhile leaves its lease to run out), 200 to the rest."""
    rng = random.Random(f"receiver-{seed}")
    return [rng.choice([503, SLOW, 200, 200, 200]) for _ in range(count)]


async def _run(config: NemesisConfig, cluster: NemesisCluster, receiver: Receiver | None) -> NemesisReport:
    targets = Targets(
        workers=tuple(s.name for s in cluster.workers),
        gateways=tuple(s.name for s in cluster.client_gateways),
        heartbeat_ttl_s=cluster.config.heartbeat_ttl_s,
    )
    schedule = make_schedule(config.seed, config.duration_s, config.counts, targets)
    history = History()
    t0 = time.monotonic()
    clients = Clients([s.url for s in cluster.client_gateways], config.load, history, config.seed, t0)
    runner = FaultRunner(cluster, config.seed)
    try:
        most_rows_held = await _under_faults(clients, runner, schedule, t0)
        quiet_at = await _settle(cluster, clients, history, runner.last_end + config.quiet_bound_s)
        await _read_all(clients, history)
        state = await _cluster_state(cluster, clients, history, receiver)
    finally:
        await clients.close()
        (cluster.config.work_dir / "history.json").write_text(json.dumps(history.to_json()))
    report = NemesisReport(
        seed=config.seed,
        duration_s=config.duration_s,
        schedule=[f.describe() for f in schedule],
        injected=runner.injected,
        rollbacks=runner.rollbacks,
        verdict=check(history, state, runner.rollbacks),
        quiet_after_last_fault_s=None if quiet_at is None else round(quiet_at - runner.last_end, 2),
        quiet_bound_s=config.quiet_bound_s,
        proxies={s.name: dataclasses.asdict(s.proxy.stats) for s in cluster.slots.values()},
        logs=str(cluster.config.work_dir),
        most_rows_held=most_rows_held,
    )
    (cluster.config.work_dir / "report.json").write_text(json.dumps(report.to_json(), indent=2))
    return report


async def _under_faults(clients: Clients, runner: FaultRunner, schedule: list[Fault], t0: float) -> int:
    """Clients send while the schedule runs; they stop once every fault has ended. Returns the most rows one
    worker held at once meanwhile."""
    stop = asyncio.Event()
    load = asyncio.create_task(clients.run(stop))
    held = asyncio.create_task(_most_rows_held(runner.cluster, stop))
    try:
        await runner.run(schedule, t0)
    finally:
        stop.set()
        await load
    return await held


async def _most_rows_held(cluster: NemesisCluster, stop: asyncio.Event) -> int:
    """The most rows (rows less free rows) one worker's registry entry said it held, sampled every QUIET_POLL_S
    until `stop`; a sample Redis does not answer (restarted, rolled back) is skipped."""
    registry = Registry(cluster.admin, cluster.keys)
    most = 0
    while not stop.is_set():
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            workers = await asyncio.wait_for(registry.workers(), QUIET_POLL_S * 4)
            most = max([most, *(w.rows - w.free_rows for w in workers)])
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), QUIET_POLL_S)
    return most


async def _settle(cluster: NemesisCluster, clients: Clients, history: History, deadline: float) -> float | None:
    """Follow every accepted request without a terminal answer until the cluster is quiet (returns when,
    time.monotonic()) or `deadline`. A request whose jobs all vanished (404) is asked again with its key."""
    rng = random.Random(0)
    asked_again: dict[str, int] = {}
    while time.monotonic() < deadline:
        for request in history.waiting():
            if history.vanished(request) and asked_again.get(request.key, 0) < MAX_ASKED_AGAIN:
                asked_again[request.key] = asked_again.get(request.key, 0) + 1
                await clients.submit(rng, "jobs", request.key, request.body)
                continue
            for job_id in sorted(request.job_ids):
                await clients.read(rng.choice(clients.urls), job_id)
        if not history.waiting() and await _drained(cluster) and await _outbox_depth(cluster) == 0:
            return time.monotonic()
        await asyncio.sleep(QUIET_POLL_S)
    return None


async def _drained(cluster: NemesisCluster) -> bool:
    try:
        return await _pending(cluster) == 0 and await JobStreams(cluster.admin, cluster.keys).depth() == 0
    except RedisError:
        return False


async def _pending(cluster: NemesisCluster) -> int:
    """Entries delivered and not acknowledged, over every job stream."""
    total = 0
    for stream in await JobStreams(cluster.admin, cluster.keys).names():
        try:
            summary = await cluster.admin.xpending(stream, cluster.keys.workers_group)
        except RedisError:  # a stream without its group: nothing was delivered from it
            continue
        total += int(summary["pending"])
    return total


async def _read_all(clients: Clients, history: History) -> None:
    """One last read of every accepted job: a result that changed since it was first seen shows here."""
    rng = random.Random(1)
    for job_id in sorted(history.accepted_ids()):
        await clients.read(rng.choice(clients.urls), job_id)


async def _outbox_depth(cluster: NemesisCluster) -> int:
    """Jobs with webhook messages still due (-1 while Redis does not answer)."""
    try:
        return int(await cluster.admin.zcard(cluster.keys.webhooks_due))
    except RedisError:
        return -1


def _delivered(receiver: Receiver | None) -> set[str]:
    """The jobs whose webhooks reached the receiver (and were answered, or not: a 503 still delivered the
    message's content, but only a 200 ends it; a job still due shows in the outbox depth)."""
    found = set()
    for hit in receiver.hits if receiver is not None else []:
        try:
            found.add(str(json.loads(hit.body)["data"]["id"]))
        except (ValueError, KeyError, TypeError):
            continue
    return found


async def _cluster_state(
    cluster: NemesisCluster, clients: Clients, history: History, receiver: Receiver | None
) -> ClusterState:
    streams = JobStreams(cluster.admin, cluster.keys)
    return ClusterState(
        webhooks_missing=webhooks_missing(history, _delivered(receiver)) if receiver is not None else [],
        outbox_depth=await _outbox_depth(cluster) if receiver is not None else 0,
        webhooks_received=len(receiver.hits) if receiver is not None else 0,
        pending_entries=await _pending(cluster),
        queue_depth=await streams.depth(),
        stuck_records=await _stuck_records(cluster),
        dead_processes=cluster.dead(),
        failed_probes=[p for slot in cluster.client_gateways if (p := await _probe(clients, slot.url, slot.name))],
        counters=await streams.counters(),
    )


async def _stuck_records(cluster: NemesisCluster) -> list[str]:
    """Jobs whose record says queued or running and that have no result."""
    stuck = []
    async for key in cluster.admin.scan_iter(match=cluster.keys.job("*"), count=500):
        job_id = key.decode().rsplit(":", 1)[1]
        status = await cluster.admin.hget(key, "status")
        if status in (b"queued", b"running") and not await cluster.admin.exists(cluster.keys.result(job_id)):
            stuck.append(job_id)
    return sorted(stuck)


async def _probe(clients: Clients, url: str, name: str) -> str | None:
    """None if the gateway at `url` answers a new /v1/generate with images, else what went wrong."""
    rng = random.Random(name)
    key = f"probe-{name}-{rng.getrandbits(32)}"
    answer = await clients.submit(rng, "generate", key, {"prompt": f"probe {name}"}, record=False, urls=[url])
    if answer.status == 200 and answer.state in TERMINAL:
        return None
    return f"{name}: {answer.status} {answer.error or answer.state}"


def _offenders(v: Verdict) -> dict[str, list[str]]:
    return {
        "lost (keys)": v.lost,
        "stuck (keys)": v.stuck,
        "duplicate results (job ids)": list(v.duplicate_results),
        "stuck records (job ids)": v.state.stuck_records,
    }


def render(report: NemesisReport) -> str:
    """A readable summary: the verdict first, then the counts, then what was injected."""
    v = report.verdict
    quiet = "not within" if report.quiet_after_last_fault_s is None else f"{report.quiet_after_last_fault_s}s,"
    lines = [
        f"nemesis seed {report.seed}: {'PASSED' if v.passed else 'FAILED'}",
        *(f"  violation: {text}" for text in v.violations),
        f"requests {v.requests}: accepted {v.accepted}, answered {v.answered}, unacknowledged {v.unacknowledged}",
        f"lost {len(v.lost)}, stuck {len(v.stuck)}, duplicate visible results {len(v.duplicate_results)}, "
        f"answered twice {len(v.answered_twice)}; after rollbacks: asked again {len(v.resubmitted)}, "
        f"results forgotten {len(v.forgotten)}, jobs run again {len(v.rerun_after_rollback)}",
        *(f"  {name}: {', '.join(ids[:5])}" for name, ids in _offenders(v).items() if ids),
        f"pending entries {v.state.pending_entries}, queue depth {v.state.queue_depth}, counters {v.state.counters}",
        f"webhooks: attempts received {v.state.webhooks_received}, ended jobs without one "
        f"{len(v.state.webhooks_missing)}, jobs still due {v.state.outbox_depth}",
        f"quiet after the last fault: {quiet} bound {report.quiet_bound_s}s; most rows one worker held "
        f"{report.most_rows_held}",
        f"faults ({len(report.schedule)} scheduled):",
        *(f"  {f['at_s']:7.2f}s {f['kind']:<18} {f['target']:<10} {f['detail']}" for f in report.injected),
        *(
            f"rollback: snapshot {r.taken_s:.3f}s, old server stopped {r.stopped_s:.3f}s, restored {r.restored_s:.3f}s"
            for r in report.rollbacks
        ),
        f"logs, report.json and history.json: {report.logs}",
    ]
    return "\n".join(lines)
