"""`sdxl-serve up`: a whole cluster on one host, for demos and development, kept running.

Starts a private redis-server (unless given --redis-url), one gateway and N workers as child processes,
and prints `ready: http://HOST:PORT (Redis URL)` once every worker is warm. While it runs, a state file tells
`sdxl-serve status` on this machine where its Redis is, and a second `up` (without --redis-url) joins it with
more workers instead of starting a cluster of its own (sdxl_serve/local_up.py).

Then it supervises: a child that exits is started again after a delay that doubles with each of its recent
exits, and one that keeps exiting (more than --restart-limit times within --restart-window seconds) is given
up on, with a message naming it and its exit status. The gateway keeps serving meanwhile: a job whose worker
died is taken over by another one or by its replacement. Without a gateway, or with every worker given up on,
the cluster cannot serve and `up` stops. On Ctrl-C or SIGTERM it stops every child it started, workers first
(they drain), Redis last. Children also die with it if it is killed outright.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from common.config import (
    add_blob_store_argument,
    add_eviction_argument,
    add_redis_arguments,
    default_cache_dir,
    mask_url,
    require,
    require_blob_store_url,
)
from common.protocol import Size
from common.redis_conn import connect
from common.rediskeys import DEFAULT_PREFIX, RedisKeys
from common.registry import Registry
from gateway.cli import add_policy_arguments, add_routing_argument, policy_config
from gateway.config import GatewayConfig, PolicyConfig, RoutingPolicy
from sdxl_serve.local_up import RunningUp, announced, find_running
from sdxl_serve.processes import ProcessError, RedisServer, spawn, start_redis_server, stop, wait_http
from worker.cli import (
    add_compile_cache_arguments,
    add_model_arguments,
    add_safety_checker_arguments,
    add_watermark_argument,
    lora_settings,
)
from worker.config import DEFAULT_MODEL, Attention, WorkerConfig, default_compile_cache_dir

logger = logging.getLogger(__name__)

# Longer than a worker's default --drain-timeout (120 s): a draining worker is never killed mid-job.
STOP_TIMEOUT_S = 150.0


class ClusterError(RuntimeError):
    """The cluster could not start; the message says which part and why."""


@dataclass(frozen=True)
class RestartPolicy:
    """When a child that exited is started again, and when `up` gives up on it."""

    delay_s: float = 1.0  # before the first restart; doubles with each further exit within the window
    max_delay_s: float = 30.0
    limit: int = 5  # restarts within the window; one more exit and the child is left down
    window_s: float = 60.0

    def __post_init__(self) -> None:
        require(self.delay_s > 0, "--restart-delay", "must be > 0")
        require(self.max_delay_s >= self.delay_s, "--restart-max-delay", "must be >= --restart-delay")
        require(self.limit >= 0, "--restart-limit", "must be >= 0")
        require(self.window_s > 0, "--restart-window", "must be > 0")

    def delay(self, recent_exits: int) -> float:
        """Seconds to wait before a restart, after `recent_exits` exits within the window (>= 1)."""
        return float(min(self.delay_s * 2 ** (recent_exits - 1), self.max_delay_s))


@dataclass(frozen=True)
class UpConfig:
    """Settings of one `sdxl-serve up`. `redis_url=None`: start a private redis-server; `blob_store=None`:
    keep images in a directory of this run (removed when it stops); `model=None`: SDXL base where there is an
    accelerator, else the tiny model (made under `cache_dir` on first use)."""

    redis_url: str | None = None
    allow_evicting_redis: bool = False
    blob_store: str | None = None
    key_prefix: str = DEFAULT_PREFIX
    workers: int = 1
    join: bool = True  # without --redis-url: add workers to the `up` already running here, if there is one
    host: str = "127.0.0.1"
    port: int = 8000
    routing: RoutingPolicy = GatewayConfig.routing
    model: str | None = None
    revision: str | None = None
    model_config: str | None = None
    sizes: tuple[Size, ...] | None = None
    max_steps: int = WorkerConfig.max_steps
    default_steps: int | None = None
    images_per_request: int = WorkerConfig.images_per_request
    engine: Literal["rows", "request"] = WorkerConfig.engine
    rows_per_device: int = WorkerConfig.rows_per_device
    batch_policy: Literal["fifo", "shortest"] = WorkerConfig.batch_policy
    cpu_devices: int = WorkerConfig.cpu_devices
    attention: Attention = WorkerConfig.attention
    watermark: bool = WorkerConfig.watermark
    safety_checker: Path | None = WorkerConfig.safety_checker
    safety_replace: Literal["black", "blur"] = WorkerConfig.safety_replace
    lora_dir: str | None = WorkerConfig.lora_dir
    lora_cache: int = WorkerConfig.lora_cache
    max_loras: int = WorkerConfig.max_loras
    lora_max_rank: int = WorkerConfig.lora_max_rank
    lora_max_mb: float = WorkerConfig.lora_max_mb
    policy: PolicyConfig = dataclasses.field(
        default_factory=PolicyConfig
    )  # the gateway's prompt blocklist and moderation hook
    compile_cache: Path | None = dataclasses.field(default_factory=default_compile_cache_dir)
    compile_cache_max_gb: float = WorkerConfig.compile_cache_max_bytes / 1e9
    cache_dir: Path = dataclasses.field(default_factory=default_cache_dir)
    ready_timeout_s: float = 600.0
    restart: RestartPolicy = RestartPolicy()
    log_level: str = "info"
    log_format: str = "text"

    def __post_init__(self) -> None:
        require(self.workers >= 1, "--workers", "must be >= 1")
        require(1 <= self.port <= 65535, "--port", "must be 1..65535")
        require(self.ready_timeout_s > 0, "--ready-timeout", "must be > 0")
        if self.blob_store is not None:
            require_blob_store_url(self.blob_store)
        # Checked here, not only by the worker: a worker that cannot start would be restarted to no end.
        require(
            self.safety_checker is None or self.safety_checker.is_dir(),
            "--safety-checker",
            "must be a folder holding config.json and model.safetensors",
        )
        WorkerConfig(  # the workers' LoRA rules, with their flags' names
            lora_dir=self.lora_dir,
            lora_cache=self.lora_cache,
            max_loras=self.max_loras,
            lora_max_rank=self.lora_max_rank,
            lora_max_mb=self.lora_max_mb,
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> UpConfig:
        """The config the command line describes; ConfigError names a bad flag."""
        restart = RestartPolicy(
            delay_s=args.restart_delay,
            max_delay_s=args.restart_max_delay,
            limit=args.restart_limit,
            window_s=args.restart_window,
        )
        return cls(
            redis_url=args.redis_url,
            allow_evicting_redis=args.allow_evicting_redis,
            blob_store=args.blob_store,
            key_prefix=args.key_prefix,
            workers=args.workers,
            join=args.join,
            host=args.host,
            port=args.port,
            routing=args.routing,
            model=args.model,
            revision=args.revision,
            model_config=args.model_config,
            sizes=args.sizes,
            max_steps=args.max_steps,
            default_steps=args.default_steps,
            images_per_request=args.images_per_request,
            engine=args.engine,
            rows_per_device=args.rows_per_device,
            batch_policy=args.batch_policy,
            cpu_devices=args.cpu_devices,
            attention=args.attention,
            watermark=args.watermark == "on",
            safety_checker=args.safety_checker,
            safety_replace=args.safety_replace,
            **lora_settings(args),
            policy=policy_config(args),
            compile_cache=args.compile_cache,
            compile_cache_max_gb=args.compile_cache_max_gb,
            cache_dir=args.cache_dir,
            ready_timeout_s=args.ready_timeout,
            restart=restart,
            log_level=args.log_level,
            log_format=args.log_format,
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every flag of `sdxl-serve up`: the workers' model flags, the gateway's address, supervision."""
    add_redis_arguments(parser, default=None)
    add_eviction_argument(parser)
    add_blob_store_argument(parser, default=None)  # None: a directory of this run
    add_model_arguments(parser, None)
    parser.add_argument("--workers", type=int, default=UpConfig.workers)
    parser.add_argument(
        "--no-join",
        dest="join",
        action="store_false",
        help="start a cluster of its own even where another `sdxl-serve up` runs on this machine (by default, "
        "without --redis-url, this one adds its workers to that one's)",
    )
    add_routing_argument(parser)
    parser.add_argument("--host", default=UpConfig.host)
    parser.add_argument("--port", type=int, default=os.environ.get("PORT", str(UpConfig.port)))
    parser.add_argument(
        "--cache-dir", type=Path, default=default_cache_dir(), help="where the tiny model is made on first use"
    )
    parser.add_argument(
        "--ready-timeout",
        type=float,
        default=UpConfig.ready_timeout_s,
        help="seconds to wait for every worker to be warm",
    )
    add_compile_cache_arguments(parser)
    add_watermark_argument(parser)
    add_safety_checker_arguments(parser)
    add_policy_arguments(parser)
    _add_restart_arguments(parser.add_argument_group("supervision"))


def _add_restart_arguments(group: argparse._ArgumentGroup) -> None:
    defaults = RestartPolicy()
    group.add_argument(
        "--restart-delay",
        type=float,
        default=defaults.delay_s,
        help="seconds before a child that exited is started again; doubles with each recent exit",
    )
    group.add_argument("--restart-max-delay", type=float, default=defaults.max_delay_s, help="bound of that delay")
    group.add_argument(
        "--restart-limit",
        type=int,
        default=defaults.limit,
        help="restarts of one child within --restart-window; one more exit and it is left down",
    )
    group.add_argument("--restart-window", type=float, default=defaults.window_s, help="seconds")


def run(args: argparse.Namespace) -> int:
    """Run until interrupted; returns the exit status."""
    cluster = Cluster(UpConfig.from_args(args))
    try:
        return asyncio.run(cluster.run())
    except (ClusterError, ProcessError) as exc:
        print(f"sdxl-serve up: error: {exc}", file=sys.stderr)
        return 1


@dataclass(frozen=True)
class Resolved:
    """What `up` settles for its children where its own flags leave it open: the Redis it started, the image
    directory of this run, the model chosen for this host."""

    redis_url: str
    blob_store: str
    model: str

    @classmethod
    async def settle(
        cls,
        config: UpConfig,
        scratch: Path,
        private_redis: Callable[[], Awaitable[str]],
        default_model: Callable[[], Awaitable[str]],
    ) -> Resolved:
        """`config`'s Redis, image store and model, each settled by `up` where no flag gives it: a redis-server
        started by `private_redis`, a directory under `scratch` (so images stay out of Redis), `default_model`."""
        return cls(
            redis_url=config.redis_url or await private_redis(),
            blob_store=config.blob_store or f"file://{scratch}/images",
            model=config.model or await default_model(),
        )


def children(config: UpConfig, resolved: Resolved, *, gateway: bool = True) -> list[Child]:
    """The gateway (unless joining another `up`'s) and the workers of this cluster, each with its flags."""
    worker = ("worker", *worker_argv(config, resolved))
    workers = [Child(f"worker-{index}", worker) for index in range(config.workers)]
    return [Child("gateway", ("gateway", *gateway_argv(config, resolved))), *workers] if gateway else workers


def child_command(config: UpConfig, child: Child) -> list[str]:
    """The `sdxl-serve` arguments that start `child`: `up`'s global flags, then the child's own."""
    return ["--log-level", config.log_level, "--log-format", config.log_format, *child.argv]


def worker_argv(config: UpConfig, resolved: Resolved) -> list[str]:
    """The `sdxl-serve worker` flags of each worker of this cluster."""
    # Any free metrics port, whatever SDXL_SERVE_METRICS_PORT says: the workers share this host.
    argv = ["--redis-url", resolved.redis_url, "--key-prefix", config.key_prefix, "--model", resolved.model,
            "--blob-store", resolved.blob_store,
            "--images-per-request", str(config.images_per_request), "--cpu-devices", str(config.cpu_devices),
            "--metrics-port", "0", "--attention", config.attention,
            "--watermark", "on" if config.watermark else "off"]  # fmt: skip
    argv += _eviction_argv(config)
    if config.safety_checker is not None:
        argv += ["--safety-checker", str(config.safety_checker)]
    argv += ["--safety-replace", config.safety_replace]
    if config.revision:
        argv += ["--revision", config.revision]
    if config.model_config:
        argv += ["--model-config", config.model_config]
    if config.sizes:
        argv += ["--sizes", ",".join(map(str, config.sizes))]
    argv += ["--max-steps", str(config.max_steps)]
    argv += ["--engine", config.engine, "--rows-per-device", str(config.rows_per_device)]
    argv += ["--batch-policy", config.batch_policy]
    argv += _lora_argv(config)
    if config.default_steps is not None:
        argv += ["--default-steps", str(config.default_steps)]
    if config.compile_cache is None:
        argv.append("--no-compile-cache")
    else:
        argv += [
            "--compile-cache",
            str(config.compile_cache),
            "--compile-cache-max-gb",
            str(config.compile_cache_max_gb),
        ]
    return argv


def _lora_argv(config: UpConfig) -> list[str]:
    """The workers' LoRA flags: the folder when one is given, the pool and per-request bounds always."""
    argv = ["--lora-dir", config.lora_dir] if config.lora_dir is not None else []
    return [
        *argv, "--lora-cache", str(config.lora_cache), "--max-loras", str(config.max_loras),
        "--lora-max-rank", str(config.lora_max_rank), "--lora-max-mb", str(config.lora_max_mb),
    ]  # fmt: skip


def gateway_argv(config: UpConfig, resolved: Resolved) -> list[str]:
    """The `sdxl-serve gateway` flags of this cluster's gateway."""
    return ["--redis-url", resolved.redis_url, "--key-prefix", config.key_prefix, "--host", config.host,
            "--port", str(config.port), "--routing", config.routing, "--blob-store", resolved.blob_store,
            *_eviction_argv(config), *_policy_argv(config.policy)]  # fmt: skip


def _policy_argv(policy: PolicyConfig) -> list[str]:
    argv = ["--moderation-timeout", str(policy.moderation_timeout_s), "--moderation-fail", policy.moderation_fail]
    if policy.blocklist is not None:
        argv += ["--prompt-blocklist", str(policy.blocklist)]
    if policy.moderation_url is not None:
        argv += ["--moderation-url", policy.moderation_url]
    return argv


def _eviction_argv(config: UpConfig) -> list[str]:
    return ["--allow-evicting-redis"] if config.allow_evicting_redis else []


@dataclass(eq=False)  # each child is itself: compared and hashed by identity
class Child:
    """One supervised child: how to start it, its current process, and when it last exited."""

    name: str
    argv: tuple[str, ...]  # after `sdxl-serve`
    process: asyncio.subprocess.Process | None = None
    exits: collections.deque[float] = dataclasses.field(default_factory=collections.deque)

    @property
    def is_worker(self) -> bool:
        return self.name.startswith("worker")

    def recent_exits(self, now: float, window_s: float) -> int:
        """Record an exit at `now`; the number of exits within the last `window_s` seconds."""
        self.exits.append(now)
        while self.exits and self.exits[0] <= now - window_s:
            self.exits.popleft()
        return len(self.exits)


class Cluster:
    """The child processes of one `sdxl-serve up`, and their supervision."""

    def __init__(self, config: UpConfig) -> None:
        self.config = config
        self._children: list[Child] = []
        self._redis: RedisServer | None = None
        self._stop = asyncio.Event()
        self._joined: RunningUp | None = None  # the other `up` whose cluster this one adds workers to
        self._announced = contextlib.ExitStack()  # this one's state file, for status and later `up`s

    async def run(self) -> int:
        """Start everything, supervise until stopped, stop everything; returns the exit status."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop.set)
        with tempfile.TemporaryDirectory(prefix="sdxl-serve-up-") as scratch:
            try:
                redis_url = await self._start(Path(scratch))
                if self._stop.is_set():
                    return 0
                print(f"ready: {self._gateway_url()} (Redis {mask_url(redis_url)})", flush=True)
                return await self._supervise()
            finally:
                self._announced.close()
                await self._stop_all()

    def _gateway_url(self) -> str:
        return self._joined.url if self._joined else f"http://{self.config.host}:{self.config.port}"

    async def _start(self, scratch: Path) -> str:
        """Start the cluster's processes and wait for them; returns its Redis URL."""
        accelerator = await _accelerator_backend()
        if accelerator and self.config.workers > 1:
            raise ClusterError(
                f"each worker takes every local {accelerator} device; run --workers 1 "
                "per host (add hosts with `sdxl-serve worker --redis-url ...`)"
            )
        self._joined = find_running() if self.config.redis_url is None and self.config.join else None
        if self._joined:
            self.config = dataclasses.replace(self.config, key_prefix=self._joined.key_prefix)
            resolved = self._join(self._joined)
        else:
            resolved = await Resolved.settle(
                self.config, scratch, lambda: self._start_redis(scratch), lambda: self._default_model(accelerator)
            )
            self._announce(resolved)
        self._children = children(self.config, resolved, gateway=self._joined is None)
        for child in self._children:
            await self._launch(child)
        await self._wait_ready(resolved.redis_url)
        return resolved.redis_url

    def _join(self, other: RunningUp) -> Resolved:
        """Workers for the cluster of the `up` already running here: its Redis, image store and model."""
        _tell(
            f"joining the cluster of sdxl-serve up (pid {other.pid}) at {other.url}, Redis "
            f"{mask_url(other.redis_url)}: starting {self.config.workers} worker(s) only"
        )
        return Resolved(redis_url=other.redis_url, blob_store=other.blob_store, model=self.config.model or other.model)

    def _announce(self, resolved: Resolved) -> None:
        running = RunningUp(
            pid=os.getpid(),
            url=self._gateway_url(),
            redis_url=resolved.redis_url,
            key_prefix=self.config.key_prefix,
            blob_store=resolved.blob_store,
            model=resolved.model,
        )
        self._announced.enter_context(announced(running))

    async def _default_model(self, accelerator: str | None) -> str:
        if accelerator:
            return DEFAULT_MODEL
        directory = self.config.cache_dir / "tiny-model"
        print(
            f"no accelerator and no --model: using the tiny random-weight SDXL model at {directory} "
            "(its images are noise)",
            file=sys.stderr,
            flush=True,
        )
        return await ensure_tiny_model(directory)

    async def _start_redis(self, scratch: Path) -> str:
        self._redis = await start_redis_server(scratch)
        return self._redis.url()

    async def _launch(self, child: Child) -> None:
        child.process = await spawn(sys.executable, "-m", "sdxl_serve", *child_command(self.config, child))
        _tell(f"{child.name} started (pid {child.process.pid})")

    async def _wait_ready(self, redis_url: str) -> None:
        redis = connect(redis_url, name="sdxl-up", allow_evicting=self.config.allow_evicting_redis)
        try:
            ready = asyncio.create_task(self._ready(redis))
            died = [asyncio.create_task(_exited(c), name=c.name) for c in self._children]
            stop_requested = asyncio.create_task(self._stop.wait())
            tasks = [ready, stop_requested, *died]
            timeout = self.config.ready_timeout_s
            done, _ = await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            await _cancel(tasks)
            if not done:
                raise ClusterError(f"workers not ready after {timeout:.0f}s")
            if ready not in done and stop_requested not in done:
                name = next(t.get_name() for t in died if t in done)
                raise ClusterError(f"{name} exited during start-up (see its log above)")
            if ready in done and ready.exception() is not None:
                raise ClusterError(f"the cluster did not get ready: {ready.exception()!r}")
        finally:
            await redis.aclose()

    async def _ready(self, redis: object) -> None:
        await wait_http(f"{self._gateway_url()}/healthz", self.config.ready_timeout_s)
        registry = Registry(redis, RedisKeys(self.config.key_prefix))  # type: ignore[arg-type]
        ours = {c.process.pid for c in self._children if c.process}  # a joining `up` waits for its own workers
        await registry.wait_for_ready(self.config.workers, self.config.ready_timeout_s, among=lambda w: w.pid in ours)

    async def _supervise(self) -> int:
        """Keep every child running until stopped (0), or until the cluster cannot serve (1)."""
        keepers = {asyncio.create_task(self._keep_running(c), name=c.name): c for c in self._children}
        stop_requested = asyncio.create_task(self._stop.wait())
        pending: set[asyncio.Future[Any]] = {stop_requested, *keepers}
        try:
            while True:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # a supervisor that failed (a child that cannot be spawned) is an error
                if stop_requested in done:
                    return 0
                reason = self._cannot_serve(left={child for task, child in keepers.items() if task in pending})
                if reason:
                    _tell(f"{reason}; stopping the cluster")
                    return 1
        finally:
            await _cancel([stop_requested, *keepers])

    def _cannot_serve(self, left: set[Child]) -> str | None:
        if self._joined is None and not any(not c.is_worker for c in left):
            return "the gateway is down for good"
        if not any(c.is_worker for c in left):
            return "every worker is down for good"
        return None

    async def _keep_running(self, child: Child) -> None:
        """Restart `child` each time it exits, after the policy's delay; return once it is given up on."""
        policy = self.config.restart
        loop = asyncio.get_running_loop()
        while True:
            code = await _exited(child)
            recent = child.recent_exits(loop.time(), policy.window_s)
            if recent > policy.limit:
                _tell(
                    f"{child.name} exited ({_describe(code)}) {recent} times within {policy.window_s:g}s; "
                    "not restarting it"
                )
                return
            delay = policy.delay(recent)
            _tell(f"{child.name} exited ({_describe(code)}); restarting it in {delay:g}s")
            await asyncio.sleep(delay)  # the backoff itself; cancelled when the cluster stops
            await self._launch(child)

    async def _stop_all(self) -> None:
        # Workers first: they drain their job in hand while the gateway can still deliver it.
        await stop([c.process for c in self._children if c.is_worker and c.process], STOP_TIMEOUT_S)
        await stop([c.process for c in self._children if not c.is_worker and c.process], STOP_TIMEOUT_S)
        if self._redis is not None:
            await stop([self._redis.process], STOP_TIMEOUT_S)


async def _exited(child: Child) -> int:
    assert child.process is not None
    return await child.process.wait()


async def _cancel(tasks: Sequence[asyncio.Future[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _describe(code: int) -> str:
    """An exit status as a person reads it: `exit status 1`, or `exit status -9, killed by SIGKILL`."""
    if code >= 0:
        return f"exit status {code}"
    try:
        return f"exit status {code}, killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"exit status {code}"


def _tell(message: str) -> None:
    """A line for the person running `up`, on stderr (stdout carries only the `ready:` line)."""
    print(f"sdxl-serve up: {message}", file=sys.stderr, flush=True)


async def ensure_tiny_model(directory: Path) -> str:
    """The tiny random-weight model at `directory`, written there first if it is not."""
    if not (directory / "model_index.json").is_file():
        print("making the tiny model (once)...", file=sys.stderr, flush=True)
        process = await spawn(sys.executable, "-m", "sdxl_serve", "tiny-model", str(directory))
        if await process.wait() != 0:
            raise ClusterError("could not make the tiny model (see the log above)")
    return str(directory)


async def _accelerator_backend() -> str | None:
    """'tpu' or 'gpu' if JAX finds one here, else None. Asked in a child so this process never
    holds the devices the workers need."""
    code = "import jax; print(jax.default_backend())"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    out, _ = await process.communicate()
    backend = out.decode().strip()
    return None if backend in ("cpu", "") else backend
