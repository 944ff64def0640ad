"""A worker host cut off the network mid-job, on separate test hosts (network namespaces).

Redis, the gateway, two workers and a client each run on their own host with its own address. The
host of the worker running the job is cut from the network: its heartbeat stops, the other worker takes
the job over and the client gets its images. When the link is restored the cut worker finishes too, and
its late result is dropped: clients see one result, the first one stored.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from testkit import RedisOptions, gateway_args, sdxl_serve_argv, worker_args
from testkit.redis import redis_argv
from tests.netns import TestHost, TestNetwork, netns_available

pytestmark = pytest.mark.e2e

REDIS_PORT = 6379
GATEWAY_PORT = 8000
SLOW_STEPS = 40


def start_redis(host: TestHost, directory: Path) -> None:
    options = RedisOptions(extra=("--bind", "0.0.0.0", "--protected-mode", "no", "--notify-keyspace-events", "Kh"))
    host.run(redis_argv(options, REDIS_PORT, directory), stdout=subprocess.DEVNULL)


def start_worker(host: TestHost, redis_url: str, model: Path, log: Path) -> None:
    host.run(
        sdxl_serve_argv(*worker_args(redis_url, model, host.name, "--heartbeat-ttl", "2", max_steps=SLOW_STEPS)),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


def read(client: subprocess.Popen[str], key: str) -> Any:
    assert client.stdout is not None
    line = client.stdout.readline()
    assert line, f"the client exited before reporting {key!r}"
    return json.loads(line)[key]


def test_cut_worker_host_job_completes_elsewhere_without_duplicate(tiny_model: Path, tmp_path: Path) -> None:
    reason = netns_available()
    if reason is not None:
        pytest.skip(f"network namespaces unavailable: {reason}")
    with TestNetwork() as network:
        redis_host, gateway_host = network.add_host("redis"), network.add_host("gateway")
        workers = {name: network.add_host(name) for name in ("worker-1", "worker-2")}
        client_host = network.add_host("client")
        redis_url = f"redis://{redis_host.address}:{REDIS_PORT}/0"
        start_redis(redis_host, tmp_path)
        gateway_host.wait_for_tcp(redis_host.address, REDIS_PORT, timeout=30)
        gateway_host.run(
            sdxl_serve_argv(*gateway_args(redis_url, GATEWAY_PORT, host="0.0.0.0")),
            stdout=(tmp_path / "gateway.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        for name, host in workers.items():
            start_worker(host, redis_url, tiny_model, tmp_path / f"{name}.log")
        client_host.wait_for_tcp(gateway_host.address, GATEWAY_PORT, timeout=60)
        client = client_host.run(
            [
                sys.executable,
                "-m",
                "tests.partition_client",
                redis_url,
                f"http://{gateway_host.address}:{GATEWAY_PORT}",
                str(SLOW_STEPS),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        victim = read(client, "started")
        workers[victim].cut()
        response = read(client, "response")
        assert response["worker"] != victim
        workers[victim].restore()
        assert client.stdin is not None
        client.stdin.write("restored\n")
        client.stdin.flush()
        after = read(client, "after")
        assert (after["worker"], after["digest"]) == (response["worker"], response["digest"])
        assert after["stats"]["duplicate_results"] >= 1 and after["stats"]["reclaimed"] == 1
        assert client.wait(timeout=60) == 0
