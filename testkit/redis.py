"""Private redis-servers for tests and benchmarks: one way to start, stop, restart and roll one back.

Two handles over the same thing: `RedisProcess` for synchronous callers (pytest fixtures) and
`AsyncRedisProcess` for benchmarks and harnesses on an event loop, each with a context manager that
makes a scratch directory and removes it afterwards. Both are configured by `RedisOptions` (AOF,
`--maxmemory`, ACL users, TLS ports... as `extra` arguments) and keep their port and data directory
across restarts, so clients reconnect to the same URL and find what was persisted.

A child is tied to the thread that started it (PR_SET_PDEATHSIG fires when that thread exits): start
and restart from the main thread, never from `asyncio.to_thread`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from sdxl_serve.processes import (
    REDIS_READY_LINE,
    ProcessError,
    RedisOptions,
    RedisServer,
    free_port,
    redis_binary,
    spawn_sync,
    start_redis_server,
    stop,
    stop_sync,
)

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 30.0
DEFAULT_OPTIONS = RedisOptions()  # unpersisted, on a free loopback port
_OUTPUT_KEPT = 40  # lines of a failed start's output quoted in the error


def _url(port: int, db: int) -> str:
    return f"redis://127.0.0.1:{port}/{db}"


def _pinned(options: RedisOptions) -> RedisOptions:
    """`options` with a concrete port, so restarts come back where clients look for them."""
    return options if options.port else dataclasses.replace(options, port=free_port())


def redis_argv(options: RedisOptions, port: int, directory: Path) -> list[str]:
    """The redis-server command line for `options`, for callers that run it their own way (in a network
    namespace); `extra` comes last, so it overrides (`--bind 0.0.0.0`)."""
    return options.argv(redis_binary(), port, directory)


def copy_data(source: Path, target: Path) -> None:
    """Replace `target`'s Redis files (AOF directory, RDB) with `source`'s; other files are left alone."""
    for name in ("appendonlydir", "dump.rdb"):
        old = target / name
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
        new = source / name
        if new.is_dir():
            shutil.copytree(new, old)
        elif new.exists():
            shutil.copy2(new, old)


class RedisProcess:
    """A redis-server child for synchronous callers, restartable on the same port and data directory."""

    def __init__(self, directory: Path, options: RedisOptions = DEFAULT_OPTIONS) -> None:
        self.options = _pinned(options)
        self.port = self.options.port
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None
        self.output: list[str] = []

    def url(self, db: int = 0) -> str:
        return _url(self.port, db)

    def start(self) -> None:
        """Start and return once redis-server says it accepts connections; ProcessError with its output if
        it exits first."""
        argv = self.options.argv(redis_binary(), self.port, self.directory)
        process = spawn_sync(argv, stdout=subprocess.PIPE)
        assert process.stdout is not None
        self.output = []
        for line in process.stdout:  # redis-server says when it is ready: no polling
            self.output = [*self.output[-_OUTPUT_KEPT:], line.decode(errors="replace")]
            if REDIS_READY_LINE in line:
                self.process = process
                # Nobody reads further: a full pipe would block the server, so its output goes nowhere now.
                process.stdout.close()
                return
        process.wait()
        raise ProcessError(f"redis-server exited ({process.returncode}) before it was ready:\n{''.join(self.output)}")

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM (a clean shutdown: the AOF is flushed), SIGKILL past `timeout_s`; the exit status."""
        if self.process is None:
            return None
        process, self.process = self.process, None
        stop_sync([process], timeout_s)
        return process.returncode

    def restart(self) -> None:
        """A clean stop, then a start on the same port and directory (what the AOF kept comes back)."""
        self.stop()
        self.start()


class AsyncRedisProcess:
    """A redis-server child for callers on an event loop, restartable and restorable from a snapshot."""

    def __init__(self, directory: Path, options: RedisOptions = DEFAULT_OPTIONS) -> None:
        self.options = _pinned(options)
        self.port = self.options.port
        self.directory = directory
        self._server: RedisServer | None = None
        self.starts = 0

    def url(self, db: int = 0) -> str:
        return _url(self.port, db)

    @property
    def pid(self) -> int | None:
        return None if self._server is None else self._server.process.pid

    async def start(self) -> None:
        """Start and return once it accepts connections (ProcessError if it exits first)."""
        self._server = await start_redis_server(self.directory, self.options)
        self.starts += 1

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM (the AOF is flushed), SIGKILL past `timeout_s`."""
        server, self._server = self._server, None
        if server is not None:
            await stop([server.process], timeout_s)

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    def snapshot(self, target: Path) -> None:
        """Copy the data files as they are now to `target` (Redis keeps running). With AOF on and automatic
        rewrites off, the copy is a prefix of the history: a consistent, older state to restore later."""
        target.mkdir(parents=True, exist_ok=True)
        copy_data(self.directory, target)

    async def restore(self, snapshot: Path) -> None:
        """Stop, put the files of `snapshot` back, start: Redis comes back without the writes made since."""
        await self.stop()
        copy_data(snapshot, self.directory)
        await self.start()


@contextlib.contextmanager
def redis_process(options: RedisOptions = DEFAULT_OPTIONS) -> Iterator[RedisProcess]:
    """A started RedisProcess in a scratch directory, stopped and removed on exit."""
    directory = Path(tempfile.mkdtemp(prefix="sdxl-test-redis-"))
    server = RedisProcess(directory, options)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.asynccontextmanager
async def async_redis_process(
    options: RedisOptions = DEFAULT_OPTIONS, directory: Path | None = None
) -> AsyncIterator[AsyncRedisProcess]:
    """A started AsyncRedisProcess in `directory` (default: a scratch directory, removed on exit)."""
    scratch = directory is None
    where = Path(tempfile.mkdtemp(prefix="sdxl-bench-redis-")) if directory is None else directory
    server = AsyncRedisProcess(where, options)
    try:
        await server.start()
        yield server
    finally:
        await server.stop()
        if scratch:
            shutil.rmtree(where, ignore_errors=True)
