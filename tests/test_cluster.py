"""`sdxl-serve up` as a user runs it: one command, a `ready:` line, a working cluster, a clean stop."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import redis.asyncio as aioredis

from common.redis_conn import text
from common.rediskeys import DEFAULT_PREFIX, RedisKeys
from sdxl_serve.processes import free_port, wait_http
from sdxl_serve.up import Child, RestartPolicy
from tests.support import READY_TIMEOUT_S, scrape

WAITING = ("sdxl_gateway_waiting_requests", ())
# The gateway's address, and the Redis a person points `sdxl-serve status` or another worker at.
READY_LINE = re.compile(r"ready: (http://127\.0\.0\.1:\d+) \(Redis (redis://127\.0\.0\.1:\d+/0)\)")

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
    """A newcomer's first run: no --model, no Redis; the tiny model is made on first use, saying so. The
    images are kept in a directory of the run, not in Redis, and the directory goes when `up` stops."""
    cache = tmp_path / "cache"
    port = free_port()
    up = subprocess.Popen(  # noqa: ASYNC220 (the test talks to it through its pipes)
        [sys.executable, "-m", "sdxl_serve", "up", "--workers", "1", "--port", str(port), "--sizes", "64x64",
         "--max-steps", "2", "--cache-dir", str(cache)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp_path), "XDG_RUNTIME_DIR": str(tmp_path)},
    )  # fmt: skip
    try:
        assert up.stdout is not None and up.stderr is not None
        stderr = Stderr(up.stderr)
        await stderr.expect(r"tiny random-weight SDXL model")
        await stderr.expect(r"making the tiny model")
        stores = await children_config(stderr, "blob_store", "gateway.app", "worker.runner")
        line = await asyncio.to_thread(up.stdout.readline)  # the cluster is ready (or `up` exited)
        assert READY_LINE.fullmatch(line.strip()) and f"127.0.0.1:{port} " in line, line
        children = children_of(up.pid)
        assert len(children) == 3  # redis-server, gateway, one worker
        (store,) = set(stores.values())  # the gateway reads the images where the workers write them
        assert store.startswith(f"file://{tmp_path}/sdxl-serve-up-"), store
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{port}/v1/generate", json={"prompt": "a cat"}) as response:
                assert response.status == 200
                body = await response.json()
                assert len(body["images"]) == 4
        images = Path(urlsplit(store).path)
        assert len(files_of(images, body["id"])) == 4
        await images_not_in_redis(stderr, body["id"])
        up.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(up.wait, 120) == 0
        assert not [pid for pid in children if alive(pid)]
        assert not files_of(images, body["id"])  # the directory of the run went with it
        assert (cache / "tiny-model" / "model_index.json").is_file()
        assert up.stdout.read() == ""  # nothing but the ready line on stdout
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


def files_of(images: Path, job_id: str) -> list[Path]:
    """The image files of a job in a file store (`ttl-N/JOB/ATTEMPT/INDEX.png`)."""
    return list(images.glob(f"ttl-*/{job_id}/*/*.png"))


async def children_config(stderr: Stderr, field: str, *loggers: str) -> dict[str, str]:
    """The value of `field` each child logged in its resolved config, by the child's logger."""
    found: dict[str, str] = {}
    while set(found) != set(loggers):
        match = await stderr.expect(rf" ({'|'.join(map(re.escape, loggers))}) \[\d+\].* config {field}=(\S+)")
        found[match[1]] = match[2]
    return found


async def images_not_in_redis(stderr: Stderr, job_id: str) -> None:
    """The job's result in the Redis the gateway logged holds its metadata and no image."""
    (url,) = {
        m[1] for line in stderr.lines if (m := re.search(r" gateway\.app \[\d+\].* config redis_url=(\S+)", line))
    }
    redis = aioredis.from_url(url)
    try:
        fields = [text(f) for f in await redis.hkeys(RedisKeys(DEFAULT_PREFIX).result(job_id))]
    finally:
        await redis.aclose()
    assert "meta" in fields and not [f for f in fields if f.startswith("image:")], fields


class Stderr:
    """`up`'s stderr read line by line on a thread (it must never fill its pipe), awaited by pattern."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.pids: dict[str, int] = {}  # the latest pid `up` said it started under each name
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)

    async def expect(self, pattern: str, timeout_s: float = READY_TIMEOUT_S) -> re.Match[str]:
        """The first line from here on that matches `pattern`; fails at `timeout_s` or when stderr ends."""
        return await asyncio.to_thread(self._expect, pattern, timeout_s)

    def _expect(self, pattern: str, timeout_s: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                tail = "".join(self.lines[-40:])
                pytest.fail(f"no line matching {pattern!r} on up's stderr; its last lines:\n{tail}")
            self.lines.append(line)
            if started := re.search(r"sdxl-serve up: (\S+) started \(pid (\d+)\)", line):
                self.pids[started[1]] = int(started[2])
            if match := re.search(pattern, line):
                return match


async def generate(port: int) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{port}/v1/generate", json={"prompt": "a cat"}) as response:
            assert response.status == 200, await response.text()
            return len((await response.json())["images"])


async def waiting_requests(port: int, count: int) -> None:
    """Until the gateway says `count` requests wait for a result."""
    async with aiohttp.ClientSession() as session, asyncio.timeout(READY_TIMEOUT_S):
        while True:
            if (await scrape(session, f"http://127.0.0.1:{port}")).get(WAITING, 0) >= count:
                return
            await asyncio.sleep(0.05)  # a gauge has no event to wait on


async def test_up_restarts_a_dead_child_and_gives_up_on_a_crash_loop(tiny_model: Path, tmp_path: Path) -> None:
    """Workers and the gateway that die are started again while the rest keeps serving; a worker that keeps
    dying is left down with a message naming it and its exit status; SIGTERM still stops everything."""
    port = free_port()
    up = subprocess.Popen(  # noqa: ASYNC220 (the test talks to it through its pipes)
        [sys.executable, "-m", "sdxl_serve", "up", "--workers", "2", "--port", str(port), "--model", str(tiny_model),
         "--sizes", "64x64", "--max-steps", "2", "--cache-dir", str(tmp_path),
         "--restart-delay", "0.2", "--restart-limit", "1", "--restart-window", "600"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "XDG_RUNTIME_DIR": str(tmp_path)},
    )  # fmt: skip
    try:
        assert up.stdout is not None and up.stderr is not None
        stderr = Stderr(up.stderr)
        line = await asyncio.to_thread(up.stdout.readline)  # the cluster is ready (or `up` exited)
        assert READY_LINE.fullmatch(line.strip()) and f"127.0.0.1:{port} " in line, line
        await stderr.expect(r"worker-1 started")

        # A worker dies while a request waits at the gateway: it is restarted, and the request answered.
        request = asyncio.create_task(generate(port))
        await waiting_requests(port, 1)
        first = stderr.pids["worker-1"]
        os.kill(first, signal.SIGKILL)
        await stderr.expect(
            r"sdxl-serve up: worker-1 exited \(exit status -9, killed by SIGKILL\); restarting it in 0.2s"
        )
        await stderr.expect(r"sdxl-serve up: worker-1 started")
        assert stderr.pids["worker-1"] != first
        assert await request == 4

        # It dies again within the window: past --restart-limit, it is left down, and worker-0 serves on.
        os.kill(stderr.pids["worker-1"], signal.SIGKILL)
        await stderr.expect(
            r"sdxl-serve up: worker-1 exited \(exit status -9, killed by SIGKILL\) 2 times within 600s; "
            "not restarting it"
        )
        assert await generate(port) == 4
        assert up.poll() is None

        # The gateway dies: it is restarted on the same port.
        gateway = stderr.pids["gateway"]
        os.kill(gateway, signal.SIGKILL)
        await stderr.expect(r"sdxl-serve up: gateway exited \(exit status -9, killed by SIGKILL\); restarting it")
        await stderr.expect(r"sdxl-serve up: gateway started")
        await wait_http(f"http://127.0.0.1:{port}/healthz", READY_TIMEOUT_S)
        assert await generate(port) == 4

        children = children_of(up.pid)
        assert len(children) == 3  # redis-server, the new gateway, worker-0
        up.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(up.wait, 120) == 0
        assert not [pid for pid in children if alive(pid)]
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


def test_restart_delay_doubles_up_to_its_bound() -> None:
    policy = RestartPolicy(delay_s=0.5, max_delay_s=3.0)
    assert [policy.delay(n) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_only_exits_within_the_window_count() -> None:
    child = Child("worker-0", ("worker",))
    assert [child.recent_exits(now, window_s=10.0) for now in (0.0, 5.0, 9.0, 12.0, 30.0)] == [1, 2, 3, 3, 1]


def start_up(argv: list[str], runtime_dir: Path) -> subprocess.Popen[str]:
    """`sdxl-serve up ARGV...` with its state file under `runtime_dir` (the user's runtime directory)."""
    return subprocess.Popen(
        [sys.executable, "-m", "sdxl_serve", "up", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "XDG_RUNTIME_DIR": str(runtime_dir)},
    )


def status_of(runtime_dir: Path) -> tuple[dict[str, Any], str]:
    """`sdxl-serve status --json` as a person runs it on this machine, with no --redis-url: (status, stderr)."""
    env = {k: v for k, v in os.environ.items() if k != "SDXL_SERVE_REDIS_URL"}
    done = subprocess.run(
        [sys.executable, "-m", "sdxl_serve", "status", "--json"],
        capture_output=True,
        text=True,
        env={**env, "XDG_RUNTIME_DIR": str(runtime_dir)},
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    status: dict[str, Any] = json.loads(done.stdout)
    return status, done.stderr


async def test_status_and_a_second_up_find_the_running_up(tiny_model: Path, tmp_path: Path) -> None:
    """The `ready:` line names the cluster's Redis; `status` without --redis-url reads that cluster; a second
    `up` joins it with its workers; the state file goes when `up` stops."""
    port = free_port()
    common = ["--model", str(tiny_model), "--sizes", "64x64", "--max-steps", "2", "--cache-dir", str(tmp_path)]
    first = start_up(["--port", str(port), *common], tmp_path)
    second: subprocess.Popen[str] | None = None
    try:
        assert first.stdout is not None and first.stderr is not None
        Stderr(first.stderr)
        ready = READY_LINE.fullmatch((await asyncio.to_thread(first.stdout.readline)).strip())
        assert ready is not None and ready[1] == f"http://127.0.0.1:{port}"
        status, said = await asyncio.to_thread(status_of, tmp_path)
        assert f"sdxl-serve up (pid {first.pid}), Redis {ready[2]}" in said
        assert [w["state"] for w in status["workers"]] == ["ready"]

        second = start_up(["--workers", "1", *common], tmp_path)
        assert second.stdout is not None and second.stderr is not None
        stderr = Stderr(second.stderr)
        await stderr.expect(rf"joining the cluster of sdxl-serve up \(pid {first.pid}\) at http://127.0.0.1:{port}")
        assert (await asyncio.to_thread(second.stdout.readline)).strip() == ready[0]
        status, _ = await asyncio.to_thread(status_of, tmp_path)
        assert sorted(w["state"] for w in status["workers"]) == ["ready", "ready"]
        assert await generate(port) == 4
        second.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(second.wait, 120) == 0
        assert list((tmp_path / "sdxl-serve").glob("up-*.json")) == [tmp_path / "sdxl-serve" / f"up-{first.pid}.json"]
    finally:
        for up in (second, first):
            if up is not None and up.poll() is None:
                up.send_signal(signal.SIGTERM)
                await asyncio.to_thread(up.wait, 120)
    assert first.returncode == 0
    assert not list((tmp_path / "sdxl-serve").glob("up-*.json"))
