"""`sdxl-serve up` as a user runs it: one command, a `ready:` line, a working cluster, a clean stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from testkit import free_port

pytestmark = pytest.mark.e2e


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


async def test_up_serves_then_stops_every_child(tmp_path: Path) -> None:
    """A newcomer's first run: no --model, no Redis; the tiny model is made on first use, saying so."""
    cache = tmp_path / "cache"
    port = free_port()
    up = subprocess.Popen(  # noqa: ASYNC220 (the test waits on it alone)
        [
            sys.executable,
            "-m",
            "common.cli",
            "up",
            "--workers",
            "1",
            "--port",
            str(port),
            "--shapes",
            "64x64x2",
            "--cache-dir",
            str(cache),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert up.stdout is not None
        line = up.stdout.readline()  # blocks until the cluster is ready (or `up` exits)
        assert line.strip() == f"ready: http://127.0.0.1:{port}", line
        children = children_of(up.pid)
        assert len(children) == 3  # redis-server, gateway, one worker
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{port}/v1/generate", json={"prompt": "a cat"}) as response:
                assert response.status == 200
                assert len((await response.json())["images"]) == 4
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=120) == 0
        assert not [pid for pid in children if alive(pid)]
        assert up.stderr is not None
        log = up.stderr.read()
        assert "tiny random-weight SDXL model" in log and "making the tiny model" in log
        assert (cache / "tiny-model" / "model_index.json").is_file()
        assert up.stdout.read() == ""  # nothing but the ready line on stdout
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
