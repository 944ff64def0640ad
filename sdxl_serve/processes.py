"""Child processes: started in their own process group, dying with their parent, stopped gracefully.

One implementation for `sdxl-serve up` and for the local-process kit the tests and benchmarks use
(`testkit`): start a process, wait until it answers, stop it (SIGTERM to its group, a bounded wait, then
SIGKILL), and a private redis-server.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
REDIS_READY_LINE = b"Ready to accept connections"


class ProcessError(RuntimeError):
    """A child could not be started or exited before it was ready; the message says which."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on `host`."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def die_with_parent() -> None:
    """In a child, before exec: get SIGTERM when the parent dies, even by SIGKILL (Linux only)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _own_group_dying_with_parent() -> None:
    os.setpgid(0, 0)
    die_with_parent()


async def spawn(*argv: str, stdout: int | None = None, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    """Start `argv` in its own process group, tied to this process's life. `stdout` defaults to our stderr,
    so our own stdout carries only what we print."""
    return await asyncio.create_subprocess_exec(
        *argv,
        stdout=sys.stderr.fileno() if stdout is None else stdout,
        stdin=asyncio.subprocess.DEVNULL,
        env=env,
        preexec_fn=_own_group_dying_with_parent,
    )


def spawn_sync(
    argv: Sequence[str], *, stdout: int | object | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """`spawn` for synchronous callers (test fixtures)."""
    return subprocess.Popen(
        list(argv),
        stdout=stdout,  # type: ignore[arg-type]
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        preexec_fn=_own_group_dying_with_parent,
    )


def signal_group(pid: int, sig: signal.Signals) -> None:
    """Send `sig` to the process group led by `pid` (each child leads its own); nothing if it is gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


async def stop(processes: Sequence[asyncio.subprocess.Process], timeout_s: float) -> None:
    """SIGTERM each process's group, wait up to `timeout_s` for them all, SIGKILL the groups still there."""
    live = [p for p in processes if p.returncode is None]
    for process in live:
        signal_group(process.pid, signal.SIGTERM)
    if not live:
        return
    waits = [asyncio.create_task(p.wait()) for p in live]
    _, pending = await asyncio.wait(waits, timeout=timeout_s)
    for process in live:
        if process.returncode is None:
            logger.warning("pid %d did not stop within %.0fs of SIGTERM; killing it", process.pid, timeout_s)
            signal_group(process.pid, signal.SIGKILL)
    await asyncio.gather(*pending, return_exceptions=True)


def stop_sync(processes: Sequence[subprocess.Popen[bytes]], timeout_s: float) -> None:
    """`stop` for synchronous callers (test fixtures)."""
    live = [p for p in processes if p.poll() is None]
    for process in live:
        signal_group(process.pid, signal.SIGTERM)
    for process in live:
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            signal_group(process.pid, signal.SIGKILL)
            process.wait()


async def wait_http(url: str, timeout_s: float, process: asyncio.subprocess.Process | None = None) -> None:
    """Until `url` answers 200; ProcessError if `process` exits first, TimeoutError after `timeout_s`."""
    async with aiohttp.ClientSession() as session, asyncio.timeout(timeout_s):
        while True:
            if process is not None and process.returncode is not None:
                raise ProcessError(f"pid {process.pid} exited ({process.returncode}) before {url} answered")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.1)


@dataclass(frozen=True)
class RedisOptions:
    """How a private redis-server is run. `appendonly`: persist every write to an AOF in `directory`."""

    port: int = 0  # 0: a free loopback port
    appendonly: bool = False
    extra: tuple[str, ...] = ()  # further `--name value` arguments, e.g. ("--maxmemory", "1")

    def argv(self, binary: str, port: int, directory: Path) -> list[str]:
        appendonly = "yes" if self.appendonly else "no"
        return [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", appendonly,
                "--dir", str(directory), *self.extra]  # fmt: skip


def redis_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise ProcessError("redis-server not found: install it (apt-get install redis-server) or pass --redis-url")
    return binary


@dataclass
class RedisServer:
    """A private redis-server child: its process, port and data directory."""

    process: asyncio.subprocess.Process
    port: int
    directory: Path

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"


async def start_redis_server(directory: Path, options: RedisOptions = RedisOptions()) -> RedisServer:
    """A redis-server on loopback keeping its files in `directory`; returns once it accepts connections."""
    port = options.port or free_port()
    process = await spawn(*options.argv(redis_binary(), port, directory), stdout=asyncio.subprocess.PIPE)
    assert process.stdout is not None
    async for line in process.stdout:  # redis-server says when it is ready: no polling
        if REDIS_READY_LINE in line:
            asyncio.get_running_loop().create_task(_drain(process.stdout))
            logger.info("started redis-server on port %d", port)
            return RedisServer(process=process, port=port, directory=directory)
    await process.wait()
    raise ProcessError(f"redis-server exited ({process.returncode}) before it was ready on port {port}")


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass
