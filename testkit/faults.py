"""Carrying out a fault schedule on a `NemesisCluster`, and writing down what was done and when.

Faults with a duration (a stopped or partitioned worker, a killed one's replacement, a delay, a gateway
coming back) end in background tasks, so the schedule keeps its times; `run()` returns once every fault
has ended. Choices the schedule leaves to the moment (which client connection to kill) come from a
generator seeded from the run's seed.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

from sdxl_serve.processes import signal_group, wait_http
from testkit.checker import Rollback
from testkit.cluster import NemesisCluster, Slot
from testkit.procs import exited
from testkit.proxy import DropRule
from testkit.schedule import Fault

logger = logging.getLogger(__name__)

# Published on every channel the cluster uses: not UTF-8, not JSON, JSON of the wrong shape, empty,
# a job id nobody waits for, and a well-formed event of an unknown job.
GARBAGE: tuple[bytes, ...] = (
    b"\xff\xfe\xfa not utf-8",
    b"\x00\x01\x02",
    b"{not json",
    b"[]",
    b"",
    b"0" * 32,
    b'{"id": "00000000000000000000000000000000", "type": "started", "worker": "nobody"}',
    "caf\u00e9".encode("latin-1"),
)
GATEWAY_RESTART_TIMEOUT_S = 60.0


class FaultRunner:
    """Applies faults to a cluster; `injected` is the log of what was done, with times from `t0`."""

    def __init__(self, cluster: NemesisCluster, seed: int) -> None:
        self.cluster = cluster
        self.rng = random.Random(f"faults-{seed}")
        self.injected: list[dict[str, Any]] = []
        self.snapshot: Path | None = None
        self._snapshot_at = 0.0
        self.rollbacks: list[Rollback] = []
        self._endings: set[asyncio.Task[None]] = set()
        self._t0 = 0.0
        self.last_end = 0.0  # time.monotonic() when the last fault ended
        self._apply: dict[str, Callable[[Fault], Awaitable[str]]] = {
            "lost_reply": self._lost_reply,
            "kill_pubsub": self._kill_pubsub,
            "client_kill": self._client_kill,
            "sigkill_worker": self._sigkill_worker,
            "sigstop_worker": self._sigstop_worker,
            "restart_redis": self._restart_redis,
            "snapshot_redis": self._snapshot_redis,
            "rollback_redis": self._rollback_redis,
            "garbage": self._garbage,
            "restart_gateway": self._restart_gateway,
            "partition_worker": self._partition_worker,
            "delay": self._delay,
        }

    def elapsed(self) -> float:
        return round(time.monotonic() - self._t0, 3)

    async def run(self, schedule: list[Fault], t0: float) -> None:
        """Each fault at its time after `t0` (time.monotonic()); returns when all have ended. Lost-reply rules
        that never matched are disarmed at the end: no fault outlives the schedule."""
        self._t0 = t0
        for fault in schedule:
            await asyncio.sleep(max(0.0, t0 + fault.at_s - time.monotonic()))
            await self._inject(fault)
        await asyncio.gather(*self._endings)
        for slot in self.cluster.slots.values():
            slot.proxy.disarm()
        self.last_end = time.monotonic()

    async def _inject(self, fault: Fault) -> None:
        at = self.elapsed()
        try:
            detail = await self._apply[fault.kind](fault)
        except (RedisError, OSError) as exc:  # Redis down (restarting): the fault did not happen; say so
            detail = f"not injected: {type(exc).__name__}: {exc}"
        logger.info("fault at %.2fs: %s %s: %s", at, fault.kind, fault.target, detail)
        self.injected.append({"at_s": at, "kind": fault.kind, "target": fault.target, "detail": detail})

    def _later(self, delay_s: float, action: Callable[[], Awaitable[str]], what: str) -> None:
        """End a fault after `delay_s`, logged as `what`."""

        async def end() -> None:
            await asyncio.sleep(delay_s)
            detail = await action()
            self.injected.append({"at_s": self.elapsed(), "kind": what, "target": "", "detail": detail})

        task = asyncio.create_task(end())
        self._endings.add(task)
        task.add_done_callback(self._endings.discard)

    def _slot(self, fault: Fault) -> Slot:
        return self.cluster.slots[fault.target]

    # --- One coroutine per kind; each returns what it did, in words.

    async def _lost_reply(self, fault: Fault) -> str:
        rule = DropRule(fault.params["command"].encode(), fault.params["reply_contains"].encode())
        self._slot(fault).proxy.drop_reply(rule)
        return f"armed: next reply to {fault.params['command'] or 'any command'} containing {rule.reply_contains!r}"

    async def _kill_pubsub(self, fault: Fault) -> str:
        if fault.params.get("via") == "client_kill":
            killed = await self.cluster.admin.client_kill_filter(_type="pubsub")
            return f"CLIENT KILL TYPE pubsub: {killed} connection(s)"
        killed = sum(slot.proxy.kill(pubsub_only=True) for slot in self.cluster.slots.values())
        return f"proxies reset {killed} pub/sub connection(s)"

    async def _client_kill(self, fault: Fault) -> str:
        admin = self.cluster.admin
        own = int(await admin.client_id())
        victims = sorted(int(client["id"]) for client in await admin.client_list() if int(client["id"]) != own)
        if not victims:
            return "no client to kill"
        victim = self.rng.choice(victims)
        await admin.client_kill_filter(_id=str(victim))
        return f"CLIENT KILL ID {victim} (of {len(victims)})"

    async def _sigkill_worker(self, fault: Fault) -> str:
        slot = self._slot(fault)
        if not slot.alive or slot.process is None:
            return "already dead"
        signal_group(slot.process.pid, signal.SIGKILL)
        victim = slot.worker_id
        self._later(fault.duration_s, lambda: self._replace(slot), f"replace {slot.name}")
        return f"SIGKILL {victim} (pid {slot.process.pid})"

    async def _replace(self, slot: Slot) -> str:
        if slot.process is not None:
            await exited(slot.process)
        self.cluster.start_slot(slot)
        return f"started {slot.worker_id}"

    async def _sigstop_worker(self, fault: Fault) -> str:
        slot = self._slot(fault)
        if not slot.alive or slot.process is None:
            return "not running"
        pid = slot.process.pid
        signal_group(pid, signal.SIGSTOP)

        async def resume() -> str:
            signal_group(pid, signal.SIGCONT)
            return f"SIGCONT pid {pid}"

        self._later(fault.duration_s, resume, f"resume {slot.name}")
        return f"SIGSTOP {slot.worker_id} (pid {pid}) for {fault.duration_s}s"

    async def _restart_redis(self, fault: Fault) -> str:
        await self.cluster.redis.restart()
        return "clean restart (SIGTERM, AOF flushed)"

    async def _snapshot_redis(self, fault: Fault) -> str:
        self.snapshot = self.cluster.config.work_dir / "snapshot"
        self._snapshot_at = self.elapsed()
        self.cluster.redis.snapshot(self.snapshot)
        return f"copied the data files to {self.snapshot.name}/"

    async def _rollback_redis(self, fault: Fault) -> str:
        if self.snapshot is None:
            return "no snapshot yet: skipped"
        redis = self.cluster.redis
        # Stopped first, apart, to know when the old server last answered: a gateway may have read from it up
        # to then and answer after the restore (restore's own stop finds nothing left to stop).
        await redis.stop()
        stopped = self.elapsed()
        await redis.restore(self.snapshot)
        self.rollbacks.append(Rollback(self._snapshot_at, stopped, self.elapsed()))
        return f"stopped at {stopped:.2f}s, restored the snapshot of {self._snapshot_at:.2f}s, started"

    async def _garbage(self, fault: Fault) -> str:
        keys = self.cluster.keys
        channels = (keys.completions_channel, keys.job_events_channel, keys.worker_events_channel)
        for channel in channels:
            for payload in GARBAGE:
                await self.cluster.admin.publish(channel, payload)
        return f"{len(GARBAGE)} payloads on each of {', '.join(channels)}"

    async def _restart_gateway(self, fault: Fault) -> str:
        slot = self._slot(fault)
        if slot.process is not None:
            signal_group(slot.process.pid, signal.SIGKILL)
        self._later(0.0, lambda: self._bring_back(slot), f"restart {slot.name}")
        return f"SIGKILL {slot.name}"

    async def _bring_back(self, slot: Slot) -> str:
        await self._replace(slot)
        await wait_http(f"{slot.url}/healthz", GATEWAY_RESTART_TIMEOUT_S)
        return f"{slot.name} answering again"

    async def _partition_worker(self, fault: Fault) -> str:
        slot = self._slot(fault)
        refuse = bool(fault.params.get("refuse"))
        slot.proxy.partition(refuse=refuse)

        async def heal() -> str:
            slot.proxy.heal()
            return f"healed {slot.name}"

        self._later(fault.duration_s, heal, f"heal {slot.name}")
        how = "refused" if refuse else "black-holed"
        return f"{how} {slot.worker_id}'s Redis traffic for {fault.duration_s}s"

    async def _delay(self, fault: Fault) -> str:
        slot = self._slot(fault)
        slot.proxy.delay_s = float(fault.params["delay_s"])

        async def undo() -> str:
            slot.proxy.delay_s = 0.0
            return f"no more delay on {slot.name}"

        self._later(fault.duration_s, undo, f"undelay {slot.name}")
        return f"{slot.proxy.delay_s}s on every chunk for {fault.duration_s}s"
