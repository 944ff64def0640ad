"""The network-namespace harness itself (tests/netns.py): real addresses, real cuts, nothing left behind.

A redis-server on one namespace "host", clients (redis-cli and redis-py) on others. Skipped, with the
reason, where namespaces cannot be made (not root, no iproute2, a sandbox that refuses them).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from testkit import RedisOptions
from testkit.redis import redis_argv
from tests.netns import PREFIX, TestHost, TestNetwork, netns_available

REDIS_PORT = 6379
# On every address of its namespace host, reachable from the others, nothing persisted.
NAMESPACE_REDIS = RedisOptions(extra=("--bind", "0.0.0.0", "--protected-mode", "no"))
# Long enough for any answer over a working link (a fresh interpreter importing redis included), and
# for the kernel to give up resolving a cut host's address (a few seconds of ARP probes).
ANSWER_TIMEOUT_S = 20.0


@cache
def _unavailable() -> str | None:
    return netns_available()


@pytest.fixture(autouse=True)
def _require_netns() -> None:
    reason = _unavailable()
    if reason is not None:
        pytest.skip(reason)


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout


def _namespaces() -> set[str]:
    return {line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()}


def start_redis(host: TestHost) -> subprocess.Popen[bytes]:
    """redis-server on every address of `host`, returned once it says it is ready (no polling)."""
    argv = redis_argv(NAMESPACE_REDIS, REDIS_PORT, Path(tempfile.gettempdir()))
    process: subprocess.Popen[bytes] = host.run(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    assert process.stdout is not None
    for line in process.stdout:
        if b"Ready to accept connections" in line:
            return process
    pytest.fail(f"redis-server on {host.name} exited before it was ready")


def cli_ping(source: TestHost, target: TestHost) -> subprocess.Popen[str]:
    return source.run(
        ["redis-cli", "-h", target.address, "-p", str(REDIS_PORT), "ping"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def py_ping(source: TestHost, target: TestHost) -> subprocess.Popen[str]:
    # No retries: redis-py 8's default policy retries the connect and the command, so against a cut
    # host even socket_timeout=2 takes about 40 s to fail. One attempt fails in about 3 s.
    code = (
        "import redis, redis.backoff, redis.retry; "
        f"print(redis.Redis(host={target.address!r}, port={REDIS_PORT}, socket_timeout=2, "
        "retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0)).ping())"
    )
    return source.run(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def answer(process: subprocess.Popen[Any]) -> tuple[int, str]:
    """(exit status, output) of a client, which must finish within ANSWER_TIMEOUT_S either way."""
    output, _ = process.communicate(timeout=ANSWER_TIMEOUT_S)
    return process.returncode, output.strip()


def assert_reaches(source: TestHost, target: TestHost) -> None:
    cli, py = cli_ping(source, target), py_ping(source, target)  # concurrently
    assert answer(cli) == (0, "PONG"), f"redis-cli from {source.name}"
    assert answer(py) == (0, "True"), f"redis-py from {source.name}"


def test_hosts_talk_over_their_own_addresses_and_a_cut_isolates_one() -> None:
    with TestNetwork() as net:
        a, b, c = net.add_host("a"), net.add_host("b"), net.add_host("c")
        assert len({a.address, b.address, c.address}) == 3
        assert all(h.address.startswith("10.213.0.") for h in (a, b, c))
        start_redis(a)
        b.wait_for_tcp(a.address, REDIS_PORT, timeout=10)
        assert_reaches(b, a)
        assert_reaches(c, a)

        # An established connection from B, to see what a cut does to one.
        established = b.socket()
        established.settimeout(5)
        established.connect((a.address, REDIS_PORT))
        established.sendall(b"PING\r\n")
        assert established.recv(64) == b"+PONG\r\n"

        b.cut()
        started = time.monotonic()
        cli, py, other = cli_ping(b, a), py_ping(b, a), cli_ping(c, a)
        cli_status, cli_output = answer(cli)
        py_status, py_output = answer(py)
        assert cli_status != 0 and "PONG" not in cli_output, cli_output
        assert py_status != 0 and ("TimeoutError" in py_output or "ConnectionError" in py_output), py_output
        assert time.monotonic() - started < ANSWER_TIMEOUT_S
        assert answer(other) == (0, "PONG"), "C lost A when only B was cut"
        # The cut is silent: no reset, the established connection just stalls.
        established.sendall(b"PING\r\n")
        established.settimeout(1)
        with pytest.raises(TimeoutError):
            established.recv(64)

        b.restore()
        assert_reaches(b, a)
        # TCP's retransmission delivers the PING sent during the cut: the connection survived it.
        established.settimeout(ANSWER_TIMEOUT_S)
        assert established.recv(64) == b"+PONG\r\n"
        established.close()


def test_teardown_kills_every_process_and_deletes_every_namespace_even_on_failure() -> None:
    network = TestNetwork()
    with pytest.raises(RuntimeError, match="the test failed"), network as net:
        a, b = net.add_host("a"), net.add_host("b")
        redis_server = start_redis(a)
        # A child that starts a grandchild: both must die with the network.
        shell = b.run(["sh", "-c", "sleep 300 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
        assert shell.stdout is not None
        grandchild = int(shell.stdout.readline())
        created = net.namespaces
        assert set(created) <= _namespaces()
        raise RuntimeError("the test failed")
    assert redis_server.returncode is not None and shell.returncode is not None
    assert not _running(grandchild)
    assert not set(created) & _namespaces()
    assert not [ns for ns in _namespaces() if ns.startswith(network.tag)]


def _running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (an orphan waits for init to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _root_state() -> dict[str, Any]:
    """What of the root namespace's networking the harness must not change."""
    return {
        "links": sorted(re.findall(r"^\d+: ([^:@]+)", _ip("-o", "link", "show"), re.MULTILINE)),
        "addresses": sorted(line.split()[3] for line in _ip("-o", "addr", "show").splitlines()),
        "routes": _ip("route", "show", "table", "all"),
    }


def test_root_namespace_gets_no_device_address_or_route() -> None:
    before = _root_state()
    with TestNetwork() as net:
        net.add_host("a")
        net.add_host("b")
        during = _root_state()
    assert during == before
    assert "10.213.0." not in during["routes"]
    assert not [address for address in during["addresses"] if address.startswith("10.213.0.")]
    assert _root_state() == before


def test_leftovers_of_dead_runs_are_removed_and_live_runs_left_alone() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, live = f"{PREFIX}{dead.pid}-dead-x", f"{PREFIX}{os.getpid()}-live-x"
    _ip("netns", "add", stale)
    _ip("netns", "add", live)
    try:
        with TestNetwork():
            remaining = _namespaces()
        assert stale not in remaining
        assert live in remaining
    finally:
        for namespace in (stale, live):
            if namespace in _namespaces():
                _ip("netns", "del", namespace)


def test_host_names_are_checked() -> None:
    with TestNetwork() as net:
        net.add_host("a")
        with pytest.raises(ValueError, match="already exists"):
            net.add_host("a")
        with pytest.raises(ValueError, match="host name"):
            net.add_host("Bad Name")
