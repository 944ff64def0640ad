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
