"""`sdxl-serve up`: a whole cluster on one host, for demos and development.

Starts a private redis-server (unless given --redis-url), one gateway and N workers as child processes,
prints `ready: http://HOST:PORT` once every worker is warm, and on Ctrl-C or SIGTERM stops every child it
started, workers first (they drain), Redis last. Children also die with it if it is killed outright.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path

import aiohttp

from common.redis_conn import connect
from common.rediskeys import RedisKeys
from common.registry import Registry

logger = logging.getLogger(__name__)

# Longer than a worker's default --drain-timeout (120 s): a draining worker is never killed mid-job.
STOP_TIMEOUT_S = 150.0
_PR_SET_PDEATHSIG = 1
_STDERR = 2


class ClusterError(RuntimeError):
    """The cluster could not start; the message says which part and why."""


def run_cluster(args: argparse.Namespace) -> int:
    """Run until interrupted; returns the exit status."""
    cluster = Cluster(args)
    try:
        return asyncio.run(cluster.run())
    except ClusterError as exc:
        print(f"sdxl-serve up: error: {exc}", file=sys.stderr)
        return 1


class Cluster:
    """The child processes of one `sdxl-serve up`."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self._children: list[tuple[str, asyncio.subprocess.Process]] = []
        self._redis: asyncio.subprocess.Process | None = None
        self._stop = asyncio.Event()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop.set)
        with tempfile.TemporaryDirectory(prefix="sdxl-serve-up-") as scratch:
            try:
                redis_url = self.args.redis_url or await self._start_redis(Path(scratch))
                await self._start(redis_url)
                if self._stop.is_set():
                    return 0
                print(f"ready: http://{self.args.host}:{self.args.port}", flush=True)
                return await self._supervise()
            finally:
                await self._stop_all()

    async def _start(self, redis_url: str) -> None:
        accelerator = await _accelerator_backend()
        if accelerator and self.args.workers > 1:
            raise ClusterError(
                f"each worker takes every local {accelerator} device; run --workers 1 "
                "per host (add hosts with `sdxl-serve worker --redis-url ...`)"
            )
        model = self.args.model or await self._default_model(accelerator)
        await self._spawn(
            "gateway",
            "gateway",
            "--redis-url",
            redis_url,
            "--key-prefix",
            self.args.key_prefix,
            "--host",
            self.args.host,
            "--port",
            str(self.args.port),
            "--routing",
            self.args.routing,
        )
        for index in range(self.args.workers):
            await self._spawn(f"worker-{index}", "worker", *self._worker_args(redis_url, model))
        await self._wait_ready(redis_url)

    def _worker_args(self, redis_url: str, model: str) -> list[str]:
        # Any free metrics port, whatever SDXL_SERVE_METRICS_PORT says: the workers share this host.
        args = [
            "--redis-url",
            redis_url,
            "--key-prefix",
            self.args.key_prefix,
            "--model",
            model,
            "--images-per-request",
            str(self.args.images_per_request),
            "--cpu-devices",
            str(self.args.cpu_devices),
            "--metrics-port",
            "0",
            "--attention",
            self.args.attention,
        ]
        if self.args.revision:
            args += ["--revision", self.args.revision]
        if self.args.shapes:
            args += ["--shapes", ",".join(map(str, self.args.shapes))]
        if self.args.compile_cache is None:
            args.append("--no-compile-cache")
        else:
            args += [
                "--compile-cache",
                str(self.args.compile_cache),
                "--compile-cache-max-gb",
                str(self.args.compile_cache_max_gb),
            ]
        return args

    async def _default_model(self, accelerator: str | None) -> str:
        from common.config import DEFAULT_MODEL

        if accelerator:
            return DEFAULT_MODEL
        directory = self.args.cache_dir / "tiny-model"
        print(
            f"no accelerator and no --model: using the tiny random-weight SDXL model at {directory} "
            "(its images are noise)",
            file=sys.stderr,
            flush=True,
        )
        return await ensure_tiny_model(directory)

    async def _start_redis(self, scratch: Path) -> str:
        self._redis, url = await start_redis_server(scratch)
        return url

    async def _spawn(self, name: str, *args: str) -> None:
        process = await _exec(
            sys.executable,
            "-m",
            "common.cli",
            "--log-level",
            self.args.log_level,
            "--log-format",
            self.args.log_format,
            *args,
        )
        self._children.append((name, process))

    async def _wait_ready(self, redis_url: str) -> None:
        redis = connect(redis_url, name="sdxl-up")
        try:
            ready = asyncio.create_task(self._ready(redis))
            died = [asyncio.create_task(p.wait(), name=n) for n, p in self._children]
            stop = asyncio.create_task(self._stop.wait())
            done, _ = await asyncio.wait(
                [ready, stop, *died], timeout=self.args.ready_timeout, return_when=asyncio.FIRST_COMPLETED
            )
            for task in [ready, stop, *died]:
                task.cancel()
            if not done:
                raise ClusterError(f"workers not ready after {self.args.ready_timeout:.0f}s")
            if ready not in done and stop not in done:
                name = next(t.get_name() for t in died if t in done)
                raise ClusterError(f"{name} exited during start-up (see its log above)")
        finally:
            await redis.aclose()

    async def _ready(self, redis: object) -> None:
        await wait_http(f"http://{self.args.host}:{self.args.port}/healthz", self.args.ready_timeout)
        registry = Registry(redis, RedisKeys(self.args.key_prefix))  # type: ignore[arg-type]
        await registry.wait_for_ready(self.args.workers, self.args.ready_timeout)

    async def _supervise(self) -> int:
        died = [asyncio.create_task(p.wait(), name=n) for n, p in self._children]
        stop = asyncio.create_task(self._stop.wait())
        done, _ = await asyncio.wait([stop, *died], return_when=asyncio.FIRST_COMPLETED)
        for task in [stop, *died]:
            task.cancel()
        if stop in done:
            return 0
        name = next(t.get_name() for t in died if t in done)
        print(f"sdxl-serve up: {name} exited; stopping the cluster", file=sys.stderr, flush=True)
        return 1

    async def _stop_all(self) -> None:
        # Workers first: they drain their job in hand while the gateway can still deliver it.
        await _terminate([p for n, p in self._children if _is_worker(n)])
        await _terminate([p for n, p in self._children if not _is_worker(n)])
        if self._redis is not None:
            await _terminate([self._redis])


def _is_worker(name: str) -> bool:
    return name.startswith("worker")


async def _terminate(processes: list[asyncio.subprocess.Process]) -> None:
    """SIGTERM, wait for a graceful exit, SIGKILL whatever is left."""
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
    waits = [asyncio.create_task(p.wait()) for p in processes]
    if not waits:
        return
    _, pending = await asyncio.wait(waits, timeout=STOP_TIMEOUT_S)
    for process in processes:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
    await asyncio.gather(*pending, return_exceptions=True)


async def ensure_tiny_model(directory: Path) -> str:
    """The tiny random-weight model at `directory`, written there first if it is not."""
    if not (directory / "model_index.json").is_file():
        print("making the tiny model (once)...", file=sys.stderr, flush=True)
        process = await _exec(sys.executable, "-m", "common.cli", "tiny-model", str(directory))
        if await process.wait() != 0:
            raise ClusterError("could not make the tiny model (see the log above)")
    return str(directory)


async def start_redis_server(scratch: Path) -> tuple[asyncio.subprocess.Process, str]:
    """A private, unpersisted redis-server on a free loopback port; returns it and its URL."""
    server = shutil.which("redis-server")
    if server is None:
        raise ClusterError("redis-server not found: install it (apt-get install redis-server) or pass --redis-url")
    port = free_port()
    process = await _exec(
        server,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(scratch),
        stdout=asyncio.subprocess.PIPE,
    )
    await _wait_for_line(process, b"Ready to accept connections", "redis-server")
    logger.info("started redis-server on port %d", port)
    return process, f"redis://127.0.0.1:{port}/0"


async def _exec(*argv: str, stdout: int = _STDERR) -> asyncio.subprocess.Process:
    """Start a child; its stdout goes to our stderr, so our stdout carries only the `ready:` line."""
    return await asyncio.create_subprocess_exec(
        *argv, stdout=stdout, stdin=asyncio.subprocess.DEVNULL, preexec_fn=_die_with_parent
    )


def _die_with_parent() -> None:
    """In the child: get SIGTERM when `sdxl-serve up` dies, even by SIGKILL (Linux only)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


async def _wait_for_line(process: asyncio.subprocess.Process, marker: bytes, name: str) -> None:
    assert process.stdout is not None
    async for line in process.stdout:
        if marker in line:
            asyncio.get_running_loop().create_task(_drain(process.stdout))
            return
    raise ClusterError(f"{name} exited before it was ready")


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass


async def wait_http(url: str, timeout_s: float) -> None:
    async with aiohttp.ClientSession() as session, asyncio.timeout(timeout_s):
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.2)


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


def free_port() -> int:
    """A TCP port that was free a moment ago on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
