"""How the commands on this machine find a running `sdxl-serve up`: a small state file it writes.

`up` with its own private Redis writes `up-PID.json` under the user's runtime directory ($XDG_RUNTIME_DIR,
else the cache directory) with that Redis's URL, its key prefix, image store and model, and removes it when it
stops. `sdxl-serve status` without --redis-url reads the cluster found there, and a second `up` without
--redis-url joins it with more workers. A file whose pid is no longer running (an `up` killed outright) is
ignored and removed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel

from common.config import default_cache_dir


class RunningUp(BaseModel):
    """What a running `up` tells the other commands of this machine."""

    pid: int
    url: str  # its gateway
    redis_url: str
    key_prefix: str
    blob_store: str
    model: str


def state_dir() -> Path:
    """Per-user and private to this machine: the runtime directory where there is one."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "sdxl-serve" if runtime else default_cache_dir() / "run"


@contextlib.contextmanager
def announced(running: RunningUp) -> Iterator[Path]:
    """The state file of `running`, there for as long as the block runs."""
    directory = state_dir()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / f"up-{running.pid}.json"
    staging = path.with_suffix(".tmp")
    staging.write_text(running.model_dump_json())
    staging.replace(path)  # a reader never sees half a file
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def find_running() -> RunningUp | None:
    """The most recently started `up` of this machine that is still running, if any."""
    found = []
    for path in state_dir().glob("up-*.json"):
        running = _read(path)
        if running is None:
            continue
        if _alive(running.pid):
            found.append((path.stat().st_mtime, running))
        else:  # an `up` killed outright left it behind
            path.unlink(missing_ok=True)
    return max(found, key=lambda pair: pair[0])[1] if found else None


def _read(path: Path) -> RunningUp | None:
    try:
        return RunningUp.model_validate_json(path.read_text())
    except (OSError, ValueError):  # removed meanwhile, or not ours
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process reuses the pid
        return False
    return True
