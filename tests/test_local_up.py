"""sdxl_serve/local_up.py: the state file a running `sdxl-serve up` leaves for the other commands of the machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdxl_serve.local_up import RunningUp, announced, find_running, state_dir


@pytest.fixture(autouse=True)
def _runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))


def running(pid: int) -> RunningUp:
    return RunningUp(
        pid=pid, url="http://127.0.0.1:8000", redis_url="redis://127.0.0.1:1/0", key_prefix="sdxl",
        blob_store="file:///tmp/images", model="/models/tiny",
    )  # fmt: skip


def test_a_running_up_is_found_while_it_runs_and_not_after() -> None:
    assert find_running() is None
    with announced(running(os.getpid())) as path:
        assert path.parent == state_dir() and find_running() == running(os.getpid())
    assert find_running() is None and not path.exists()


def test_the_file_of_an_up_that_was_killed_is_ignored_and_removed() -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    state_dir().mkdir(parents=True)
    stale = state_dir() / f"up-{dead.pid}.json"
    stale.write_text(running(dead.pid).model_dump_json())
    assert find_running() is None
    assert not stale.exists()
