"""The fault injector's cluster: redis-server (AOF on), gateways and workers, each process reaching Redis
only through its own `FaultProxy`.

Processes live in slots (`gateway-0`, `worker-2`): a fault may kill a slot's process and start another
one in it, with the slot's proxy and (for a gateway) its HTTP port, so clients and faults keep naming the
same thing. A worker started again gets a new id, as a restarted pod or `sdxl-serve up` child would.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import redis.asyncio as aioredis

from common.redis_conn import connect
from common.rediskeys import RedisKeys
from common.registry import Registry
from sdxl_serve.processes import ProcessError, RedisOptions, free_port, signal_group, stop_sync, wait_http
from testkit.procs import ProcessGroup, exited, gateway_args, sdxl_serve_argv
from testkit.proxy import FaultProxy
from testkit.redis import AsyncRedisProcess

logger = logging.getLogger(__name__)

Role = Literal["gateway", "worker"]
# A gateway's webhook configuration: all the cluster's (`full`), or lacking the signing secret (`unsigned`) or
# the allow-list of the receiver's host (`strict`), as gateways are in the middle of a rolling change.
WebhookSetup = Literal["full", "unsigned", "strict"]
DIFFERING: tuple[WebhookSetup, ...] = ("unsigned", "strict")
# AOF on, so a restart keeps what was written; no automatic rewrite, so a copy of the AOF directory
# taken at any moment is a consistent prefix of the history (a snapshot to roll back to).
NEMESIS_REDIS = RedisOptions(appendonly=True, extra=("--auto-aof-rewrite-percentage", "0"))
NO_RATE_LIMITS = tuple(arg for name in ("address-submit", "address-read") for arg in (f"--rate-limit-{name}", "off"))


@dataclass(frozen=True)
class ClusterConfig:
    """The shape of the cluster under test."""

    work_dir: Path  # Redis data, snapshots, one log per process
    gateways: int = 2
    standin_workers: int = 3
    tiny_model: Path | None = None  # one real worker on this model, beside the stand-ins (None: none)
    shape: str = "64x64x2"
    step_s: float = 0.05  # a stand-in's seconds per denoising step
    # How the workers schedule their devices (their --engine): `rows` holds the images of several jobs at once in
    # one batch of `rows_per_device` rows per device (a stand-in has four devices); `request` one job at a time.
    engine: Literal["rows", "request"] = "rows"
    rows_per_device: int = 4
    heartbeat_ttl_s: float = 3.0
    request_timeout_s: float = 15.0
    compile_cache: Path | None = None  # the real worker's (default: under work_dir, warm after its first start)
    ready_timeout_s: float = 300.0
    webhook_secret: str | None = None  # gateways send webhooks to loopback, signed with it (None: no webhooks)
    # Gateways beyond `gateways` whose webhook configuration differs (alternately unsigned and strict): they
    # take due messages like any gateway but serve no client (they would refuse its webhooks at submit).
    differing_webhook_gateways: int = 0


@dataclass
class Slot:
    """A place for one process: its role, its proxy, the process now in it and how many came before."""

    name: str
    role: Role
    proxy: FaultProxy
    real: bool = False  # a worker running the real pipeline on the tiny model
    webhooks: WebhookSetup = "full"  # gateways
    http_port: int = 0  # gateways
    generation: int = 0
    process: subprocess.Popen[bytes] | None = None
    retired: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def worker_id(self) -> str:
        return f"{self.name}-{self.generation}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class NemesisCluster:
    """Start, break and inspect one cluster. `start()`, then faults, then `close()`."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.keys = RedisKeys()
        config.work_dir.mkdir(parents=True, exist_ok=True)
        self.redis = AsyncRedisProcess(config.work_dir / "redis", NEMESIS_REDIS)
        (config.work_dir / "redis").mkdir(exist_ok=True)
        self.processes = ProcessGroup(config.work_dir)
        self.slots: dict[str, Slot] = {}
        self._admin: aioredis.Redis | None = None

    @property
    def admin(self) -> aioredis.Redis:
        """A client straight to Redis (no proxy): the harness's own view."""
        assert self._admin is not None, "start() the cluster first"
        return self._admin

    @property
    def gateways(self) -> list[Slot]:
        return [s for s in self.slots.values() if s.role == "gateway"]

    @property
    def client_gateways(self) -> list[Slot]:
        """The gateways clients use and faults target: those with the cluster's whole webhook configuration."""
        return [s for s in self.gateways if s.webhooks == "full"]

    @property
    def workers(self) -> list[Slot]:
        return [s for s in self.slots.values() if s.role == "worker"]

    async def start(self) -> None:
        """Redis, the proxies, the gateways and the workers; returns once every one is ready."""
        await self.redis.start()
        self._admin = connect(self.redis.url(), name="nemesis-admin")  # retries: it outlives restarts
        await self._add_slots()
        for slot in self.slots.values():
            self.start_slot(slot)
        await self.wait_ready()

    async def _add_slots(self) -> None:
        config = self.config
        names: list[tuple[str, Role, bool]] = [(f"gateway-{k}", "gateway", False) for k in range(config.gateways)]
        names += [(f"worker-{k}", "worker", False) for k in range(config.standin_workers)]
        if config.tiny_model is not None:
            names.append((f"worker-{config.standin_workers}", "worker", True))
        for name, role, real in names:
            await self._add_slot(Slot(name=name, role=role, proxy=FaultProxy(name, self.redis.port), real=real))
        for k in range(config.differing_webhook_gateways):
            name = f"gateway-{config.gateways + k}"
            setup = DIFFERING[k % len(DIFFERING)]
            await self._add_slot(
                Slot(name=name, role="gateway", proxy=FaultProxy(name, self.redis.port), webhooks=setup)
            )

    async def _add_slot(self, slot: Slot) -> None:
        await slot.proxy.start()
        slot.http_port = free_port() if slot.role == "gateway" else 0
        self.slots[slot.name] = slot

    async def wait_ready(self) -> None:
        """Every gateway answers /healthz and every worker slot's current worker is registered ready;
        ProcessError (with the end of its log) if a process exits first."""
        ready = asyncio.create_task(self._ready())
        exits = {asyncio.create_task(exited(s.process)): s for s in self.slots.values() if s.process is not None}
        try:
            done, _ = await asyncio.wait({ready, *exits}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in [ready, *exits]:
                task.cancel()
        for task, slot in exits.items():
            if task in done:
                log = self.processes.log(f"{slot.name}.{slot.generation}")[-3000:]
                raise ProcessError(f"{slot.name} exited ({task.result()}) before it was ready:\n{log}")
        ready.result()  # TimeoutError past the bound

    async def _ready(self) -> None:
        bound = self.config.ready_timeout_s
        for slot in self.gateways:
            await wait_http(f"{slot.url}/healthz", bound)
        await Registry(self.admin, self.keys).wait_for_ready(len(self.workers), bound)

    def start_slot(self, slot: Slot) -> None:
        """Start the slot's next process (a new worker id for a worker); the old one must be gone."""
        if slot.process is not None:
            slot.retired.append(slot.process)
        slot.generation += 1
        # The real worker makes its own CPU devices (--cpu-devices); a test session's XLA_FLAGS would override it.
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} if slot.real else None
        slot.process = self.processes.start_argv(f"{slot.name}.{slot.generation}", self._argv(slot), env)
        logger.info("started %s (pid %d)", slot.worker_id if slot.role == "worker" else slot.name, slot.process.pid)

    def _argv(self, slot: Slot) -> list[str]:
        if slot.role == "gateway":
            return self._gateway_argv(slot)
        return self._real_worker_argv(slot) if slot.real else self._standin_argv(slot)

    def _gateway_argv(self, slot: Slot) -> list[str]:
        # One gateway routes to the shared streams, the next to workers' own streams (jobs move on exit).
        routing = "shared" if int(slot.name.rsplit("-", 1)[1]) % 2 == 0 else "p2c"
        return sdxl_serve_argv(
            *gateway_args(slot.proxy.url(), slot.http_port),
            "--request-timeout", str(self.config.request_timeout_s), "--routing", routing,
            "--max-queue-depth", "1000", *NO_RATE_LIMITS, *self._webhook_flags(slot.webhooks),
        )  # fmt: skip

    def _webhook_flags(self, setup: WebhookSetup) -> list[str]:
        """Webhooks to a receiver on loopback, retried quickly (a run lasts a minute, not a day); an `unsigned`
        gateway has no secret, a `strict` one does not allow-list loopback."""
        secret = self.config.webhook_secret
        if secret is None:
            return []
        return [
            "--webhook-allow-http", *(["--webhook-allow-hosts", "127.0.0.1"] if setup != "strict" else []),
            *(["--webhook-secret", secret] if setup != "unsigned" else []), "--webhook-timeout", "2",
            "--webhook-backoff", "0.2", "--webhook-max-backoff", "2",
        ]  # fmt: skip

    def _worker_flags(self, slot: Slot) -> list[str]:
        interval = self.config.heartbeat_ttl_s / 6
        return [
            "--redis-url", slot.proxy.url(), "--worker-id", slot.worker_id,
            "--heartbeat-interval", f"{interval:.3f}", "--heartbeat-ttl", str(self.config.heartbeat_ttl_s),
            "--engine", self.config.engine, "--rows-per-device", str(self.config.rows_per_device),
        ]  # fmt: skip

    def _standin_argv(self, slot: Slot) -> list[str]:
        return [sys.executable, "-m", "testkit.standin", *self._worker_flags(slot), *serving_flags(self.config.shape),
                "--step-s", str(self.config.step_s)]  # fmt: skip

    def _real_worker_argv(self, slot: Slot) -> list[str]:
        cache = self.config.compile_cache or self.config.work_dir / "jax-cache"
        return sdxl_serve_argv(
            "worker", *self._worker_flags(slot), *serving_flags(self.config.shape),
            "--model", str(self.config.tiny_model),
            # Four devices, as the suite's XLA_FLAGS make them (a flag already set wins over --cpu-devices).
            "--cpu-devices", "4", "--images-per-request", "4", "--metrics-host", "127.0.0.1",
            "--compile-cache", str(cache),
        )  # fmt: skip

    def dead(self) -> list[str]:
        """Slots whose current process has exited."""
        return [slot.name for slot in self.slots.values() if not slot.alive]

    async def close(self) -> None:
        for slot in self.slots.values():
            slot.proxy.heal()
            await slot.proxy.close()
            for process in [*slot.retired, *([slot.process] if slot.process else [])]:
                signal_group(process.pid, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        await asyncio.to_thread(stop_sync, list(self.processes.processes.values()), 30.0)
        if self._admin is not None:
            await self._admin.aclose()
        await self.redis.stop()


def serving_flags(shape: str) -> list[str]:
    """A worker's flags (real or stand-in) for serving `shape` (`WIDTHxHEIGHTxSTEPS`): its size, up to its steps,
    by default."""
    size, _, steps = shape.rpartition("x")
    return ["--sizes", size, "--max-steps", steps, "--default-steps", steps]
