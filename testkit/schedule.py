"""A seeded fault schedule: which fault, when, against what. The same seed gives the same schedule.

The schedule is data (a list of `Fault`), drawn up front from `random.Random(seed)`, so a report can
print it and a run can be replayed exactly (the timing of the cluster's own work varies; the faults do
not). Targets are slot names (`worker-0`, `gateway-1`): the process in a slot may be replaced during the
run, the slot stays.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

FaultKind = Literal[
    "lost_reply",  # a command reaches Redis, its reply is cut (proxy)
    "kill_pubsub",  # every pub/sub connection reset (proxy or CLIENT KILL TYPE pubsub)
    "client_kill",  # CLIENT KILL of one random client connection
    "sigkill_worker",  # SIGKILL a worker, start a replacement (a new id) after `duration_s`
    "sigstop_worker",  # SIGSTOP a worker past the heartbeat TTL, then SIGCONT
    "restart_redis",  # a clean restart (SIGTERM: the AOF is flushed)
    "snapshot_redis",  # copy the data files now (for a later rollback)
    "rollback_redis",  # stop Redis, put the last snapshot back, start it: the writes since are gone
    "garbage",  # publish garbage (non-UTF-8 included) on every channel the cluster uses
    "restart_gateway",  # SIGKILL a gateway and start it again on its port
    "partition_worker",  # black-hole (or refuse) one worker's Redis traffic for `duration_s`
    "delay",  # add latency to one process's Redis traffic for `duration_s`
]
FAULT_KINDS: tuple[FaultKind, ...] = FaultKind.__args__  # type: ignore[attr-defined]
# Kinds a caller asks for by count; snapshots are placed by the schedule itself, before each rollback.
REQUESTABLE: tuple[FaultKind, ...] = tuple(k for k in FAULT_KINDS if k != "snapshot_redis")

# Replies whose loss each process kind is exposed to: (command, bytes the reply must contain).
LOST_REPLIES: dict[str, tuple[tuple[str, str], ...]] = {
    "worker": (("XREADGROUP", "job"), ("EVALSHA", ""), ("", "")),
    "gateway": (("EVALSHA", "created"), ("HGETALL", ""), ("", "")),
}


@dataclass(frozen=True)
class Fault:
    """One scheduled fault: `at_s` after the start of the fault period."""

    at_s: float
    kind: FaultKind
    target: str = ""  # a slot name, where the fault has one
    duration_s: float = 0.0  # stops, partitions, delays: how long; SIGKILL: until the replacement starts
    params: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Targets:
    """What the faults may act on."""

    workers: tuple[str, ...]
    gateways: tuple[str, ...]
    heartbeat_ttl_s: float


def make_schedule(seed: int, duration_s: float, counts: dict[FaultKind, int], targets: Targets) -> list[Fault]:
    """`counts[kind]` faults of each kind at uniformly drawn times in [0, duration_s), sorted by time.

    Each rollback is preceded by a snapshot 2 to 6 s earlier (never before the start), so what it restores
    is a recent past that Redis has moved on from.
    """
    rng = random.Random(seed)
    # How each partition behaves comes from a generator of its own: the times and targets of every fault
    # depend only on the seed, the counts and the targets, whatever the partitions draw.
    modes = random.Random(f"partition-modes-{seed}")
    faults: list[Fault] = []
    for kind in REQUESTABLE:  # a fixed order: the draws depend on the seed alone
        for _ in range(counts.get(kind, 0)):
            faults.extend(_draw(rng, kind, round(rng.uniform(0.0, duration_s), 2), targets, modes))
    return sorted(faults, key=lambda f: (f.at_s, f.kind))


def _draw(rng: random.Random, kind: FaultKind, at_s: float, targets: Targets, modes: random.Random) -> list[Fault]:
    ttl = targets.heartbeat_ttl_s
    if kind == "lost_reply":
        role, slots = rng.choice([("worker", targets.workers), ("gateway", targets.gateways)])
        command, contains = rng.choice(LOST_REPLIES[role])
        return [Fault(at_s, kind, rng.choice(slots), params={"command": command, "reply_contains": contains})]
    if kind == "kill_pubsub":
        return [Fault(at_s, kind, params={"via": rng.choice(["proxy", "client_kill"])})]
    if kind == "sigkill_worker":
        return [Fault(at_s, kind, rng.choice(targets.workers), duration_s=round(rng.uniform(0.5, 3.0), 2))]
    if kind == "sigstop_worker":
        return [Fault(at_s, kind, rng.choice(targets.workers), duration_s=round(ttl * rng.uniform(1.5, 2.5), 2))]
    if kind == "rollback_redis":
        snapshot_at = round(max(0.0, at_s - rng.uniform(2.0, 6.0)), 2)
        return [Fault(snapshot_at, "snapshot_redis"), Fault(at_s, kind)]
    if kind == "restart_gateway":
        return [Fault(at_s, kind, rng.choice(targets.gateways))]
    if kind == "partition_worker":
        slot, duration = rng.choice(targets.workers), round(ttl * rng.uniform(1.5, 3.0), 2)
        return [Fault(at_s, kind, slot, duration_s=duration, params={"refuse": modes.random() < 0.5})]
    if kind == "delay":
        slot = rng.choice([*targets.workers, *targets.gateways])
        return [Fault(at_s, kind, slot, duration_s=round(rng.uniform(1.0, 4.0), 2), params={"delay_s": 0.2})]
    return [Fault(at_s, kind)]  # client_kill, restart_redis, garbage: the whole cluster
