"""The program's own processes as tests start them: `sdxl-serve` subcommands, each in its own process
group with its own log file, all stopped at teardown (SIGTERM to the group, a bounded wait, SIGKILL)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sdxl_serve.processes import spawn_sync, stop_sync

STOP_TIMEOUT_S = 60.0
CLI_MODULE = "sdxl_serve"


async def exited(process: subprocess.Popen[bytes]) -> int:
    """Await a child's exit without a thread (a pidfd readable once it has exited, Linux 5.3+); its status."""
    if process.poll() is not None:
        return process.returncode
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not done.done():
            done.set_result(None)

    fd = os.pidfd_open(process.pid)
    loop.add_reader(fd, wake)
    try:
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return process.wait()


def sdxl_serve_argv(*args: str) -> list[str]:
    """The command line of `sdxl-serve ARGS...` run by this interpreter (no installed script needed)."""
    return [sys.executable, "-m", CLI_MODULE, *args]


def gateway_args(redis_url: str, port: int, *flags: str, host: str = "127.0.0.1") -> list[str]:
    """`sdxl-serve` arguments of a gateway on `redis_url` listening on `host:port`, then `flags`."""
    return ["gateway", "--redis-url", redis_url, "--host", host, "--port", str(port), *flags]


def worker_args(
    redis_url: str,
    model: Path | str,
    worker_id: str,
    *flags: str,
    size: str = "64x64",
    max_steps: int = 2,
    default_steps: int | None = None,
    heartbeat_interval_s: float = 0.5,
) -> list[str]:
    """`sdxl-serve` arguments of a worker serving `size` at 1 to `max_steps` steps (`default_steps`, else
    `max_steps`, when a request names none), heartbeating every `heartbeat_interval_s`, then `flags`.

    Not `sdxl_serve.up.worker_argv`: that one writes every flag of a user's `UpConfig` (its compile cache under
    the user's home, its metrics port, its devices) for all the workers of one cluster alike. A test names only
    what it varies, one worker at a time, and leaves the rest to the worker's own defaults, which read the
    environment a test session sets (`SDXL_SERVE_COMPILE_CACHE`, `XLA_FLAGS`)."""
    steps = max_steps if default_steps is None else default_steps
    return [
        "worker", "--redis-url", redis_url, "--model", str(model), "--worker-id", worker_id,
        "--sizes", size, "--max-steps", str(max_steps), "--default-steps", str(steps),
        "--heartbeat-interval", str(heartbeat_interval_s), *flags,
    ]  # fmt: skip


def write_tiny_model(directory: Path) -> Path:
    """The tiny random-weight SDXL model, written by the CLI exactly as a user would (once per directory)."""
    if not (directory / "model_index.json").is_file():
        subprocess.run(sdxl_serve_argv("tiny-model", str(directory)), check=True, stdout=subprocess.DEVNULL)
    return directory


@dataclass
class ProcessGroup:
    """Processes started by a test, each logging to its own file in `log_dir`; `stop_all` at teardown.

    Start them from the main thread: a child is told to stop when the thread that started it exits.
    """

    log_dir: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        """`sdxl-serve ARGS...` as `name`, logging to `name`.log."""
        return self.start_argv(name, sdxl_serve_argv(*args))

    def start_argv(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Any command as `name`, logging to `name`.log; `env` replaces the environment."""
        with (self.log_dir / f"{name}.log").open("ab") as log:
            process = spawn_sync(argv, stdout=log, env=env)
        self.processes[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def stop(self, name: str, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM one process's group and wait for it (SIGKILL past `timeout_s`)."""
        stop_sync([self.processes[name]], timeout_s)

    def stop_all(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        stop_sync(list(self.processes.values()), timeout_s)
