"""Separate "hosts" on one machine for failure tests: Linux network namespaces joined by a bridge.

Why namespaces and not processes on 127.0.0.1: every host gets its own network stack and its own
address (10.213.0.N), so a gateway, Redis and workers really talk over a network, and a test can cut
one host's link the way a pulled cable or a dead switch port would. A cut is silent: packets are
dropped, nobody sends a reset, established TCP connections stall and retransmit, new connections fail
after the kernel gives up resolving the address. Killing a process or closing a socket instead would
only ever test the polite failure (an immediate RST), never the one that hangs.

Layout, all of it private to the namespaces; the root namespace's links, addresses, routes and firewall
are never touched (nothing is created in it at all)::

    namespace TAG-switch:  bridge br0 (no address)  -- p1, p2, ... (bridge side of each veth pair)
    namespace TAG-NAME:    lo, eth0 = 10.213.0.N/24 (host side of veth pair N), no default route

The hosts have no route off 10.213.0.0/24 and the switch is connected to nothing else, so this
traffic cannot leave the machine. Needs root and iproute2 (`ip`); `netns_available()` says why not.

    with TestNetwork() as net:
        redis_host, worker_host = net.add_host("redis"), net.add_host("worker")
        server = redis_host.run(["redis-server", "--bind", "0.0.0.0", "--protected-mode", "no"])
        worker_host.wait_for_tcp(redis_host.address, 6379)
        worker_host.cut()       # its link is down: it can neither send nor receive
        worker_host.restore()   # and back; connections that did not time out resume

On exit every process started through `TestHost.run` (and anything else left inside the namespaces)
is killed and every namespace is deleted, which deletes the veth pairs and the bridge with them.
Namespaces left by an earlier run that died (their tag names a process that no longer exists) are
deleted when the next network is created; those of live parallel runs are left alone.
"""

from __future__ import annotations

import ctypes
import os
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

PREFIX = "sdxlnet-"
SUBNET = "10.213.0"  # .0/24; host N gets SUBNET.N
NETMASK_BITS = 24
MAX_HOSTS = 254
_HOST_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")
_STALE = re.compile(rf"^{re.escape(PREFIX)}(\d+)-")
_CLONE_NEWNET = 0x40000000
_PROCESS_EXIT_TIMEOUT_S = 10.0


class NetnsError(RuntimeError):
    """An `ip` command failed; the message holds the command and its stderr."""


def _ip(*args: str) -> str:
    """Run `ip ARGS...`; return its stdout, raise NetnsError with its stderr if it fails."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise NetnsError(f"`ip {' '.join(args)}` failed: {result.stderr.strip() or result.returncode}")
    return result.stdout


def _run_tag() -> str:
    """A tag unique to this run: our pid (so leftovers of dead runs can be recognised) plus randomness."""
    return f"{PREFIX}{os.getpid()}-{secrets.token_hex(2)}"


def netns_available() -> str | None:
    """None if namespaces, veth pairs and bridges can be created here; otherwise why not, for a skip."""
    if os.geteuid() != 0:
        return f"network namespaces need root (running as uid {os.geteuid()})"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed: apt-get install iproute2"
    probe = f"{_run_tag()}-probe"
    try:
        _ip("netns", "add", probe)
    except NetnsError as exc:
        return f"cannot create a network namespace: {exc}"
    try:
        _ip("-n", probe, "link", "add", "br0", "type", "bridge")
        _ip("-n", probe, "link", "add", "p1", "type", "veth", "peer", "name", "p2")
    except NetnsError as exc:
        return f"cannot create a bridge or veth pair in a namespace: {exc}"
    finally:
        try:
            _ip("netns", "del", probe)
        except NetnsError:
            pass
    return None


def _namespaces() -> list[str]:
    """Names from `ip netns list` (lines look like `NAME (id: 3)` or just `NAME`)."""
    return [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_namespace_processes(namespace: str, timeout: float = _PROCESS_EXIT_TIMEOUT_S) -> list[int]:
    """SIGKILL every process in `namespace` and await each one's death; return the pids still alive.

    Through pidfds: a pid that was reused meanwhile is never signalled, and death is an event to await.
    """
    try:
        pids = [int(pid) for pid in _ip("netns", "pids", namespace).split()]
    except NetnsError:
        return []
    pidfds: dict[int, int] = {}
    for pid in pids:
        try:
            pidfds[pid] = os.pidfd_open(pid)
            signal.pidfd_send_signal(pidfds[pid], signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    survivors = []
    for pid, pidfd in pidfds.items():
        readable, _, _ = select.select([pidfd], [], [], max(0.0, deadline - time.monotonic()))
        if not readable:
            survivors.append(pid)
        os.close(pidfd)
    return survivors


def remove_stale_namespaces() -> list[str]:
    """Delete namespaces carrying our prefix whose creating process is gone; return their names."""
    removed = []
    for namespace in _namespaces():
        match = _STALE.match(namespace)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        _kill_namespace_processes(namespace)
        try:
            _ip("netns", "del", namespace)
        except NetnsError:
            continue  # another run cleaning up at the same moment
        removed.append(namespace)
    return removed


def _socket_in(namespace: str, family: int, kind: int) -> socket.socket:
    """A socket created inside `namespace` (it stays there for its life), without a subprocess.

    setns() moves only the calling thread, so a short-lived thread enters the namespace, makes the
    socket and exits; this process's own threads never leave the root namespace.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    made: list[socket.socket | BaseException] = []

    def enter_and_create() -> None:
        try:
            with open(f"/run/netns/{namespace}", "rb") as handle:
                if libc.setns(handle.fileno(), _CLONE_NEWNET) != 0:
                    error = ctypes.get_errno()
                    raise OSError(error, f"setns({namespace}): {os.strerror(error)}")
            made.append(socket.socket(family, kind))
        except BaseException as exc:
            made.append(exc)

    thread = threading.Thread(target=enter_and_create, name=f"setns-{namespace}")
    thread.start()
    thread.join()
    result = made[0]
    if isinstance(result, BaseException):
        raise result
    return result


class TestHost:
    """One namespace with one address on the test network. Created by `TestNetwork.add_host`."""

    __test__ = False  # not a pytest test class, whatever its name

    def __init__(self, network: TestNetwork, name: str, namespace: str, address: str, port: str) -> None:
        self.name = name
        self.namespace = namespace
        self.address = address
        self._network = network
        self._port = port  # the bridge-side end of this host's veth pair, in the switch namespace

    def __repr__(self) -> str:
        return f"TestHost({self.name!r}, {self.address}, namespace={self.namespace!r})"

    def run(self, argv: Sequence[str | os.PathLike[str]], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start `argv` inside this host's namespace (environment and cwd inherited unless given).

        The process gets its own session, so teardown can kill it together with its children.
        """
        popen_kwargs.setdefault("start_new_session", True)
        process: subprocess.Popen[Any] = subprocess.Popen(
            ["ip", "netns", "exec", self.namespace, *(os.fspath(arg) for arg in argv)], **popen_kwargs
        )
        self._network._processes.append(process)
        return process

    def cut(self) -> None:
        """Take this host's link down at the switch: it can neither send nor receive, silently."""
        _ip("-n", self._network.switch, "link", "set", self._port, "down")

    def restore(self) -> None:
        """Bring the link back up (the bridge runs no STP, so the port forwards at once)."""
        _ip("-n", self._network.switch, "link", "set", self._port, "up")

    def socket(self, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket in this host's namespace, usable from the test process itself."""
        return _socket_in(self.namespace, family, kind)

    def wait_for_tcp(self, address: str, port: int, timeout: float = 10.0) -> None:
        """Return once a TCP connect from this host to address:port succeeds; TimeoutError after `timeout`.

        Polls at short intervals: the kernel offers no event for "someone else started listening".
        """
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            with self.socket() as probe:
                probe.settimeout(max(0.05, min(1.0, remaining)))
                try:
                    probe.connect((address, port))
                    return
                except OSError as exc:
                    if remaining <= 0:
                        raise TimeoutError(
                            f"{self.name} could not reach {address}:{port} within {timeout}s: {exc}"
                        ) from exc
            time.sleep(0.05)


class TestNetwork:
    """A private switch and the hosts plugged into it; a context manager that removes all of it."""

    __test__ = False  # not a pytest test class, whatever its name

    def __init__(self) -> None:
        self.tag = _run_tag()
        self.switch = f"{self.tag}-switch"
        self.hosts: dict[str, TestHost] = {}
        self._namespaces: list[str] = []  # in creation order; the switch first
        self._processes: list[subprocess.Popen[Any]] = []

    def __enter__(self) -> TestNetwork:
        remove_stale_namespaces()
        try:
            self._add_namespace(self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge", "stp_state", "0")
            _ip("-n", self.switch, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        errors = self.close()
        if errors and exc_type is None:
            raise NetnsError("teardown failed: " + "; ".join(errors))

    @property
    def namespaces(self) -> list[str]:
        """Every namespace this network created (the switch and each host), for checks and debugging."""
        return list(self._namespaces)

    def _add_namespace(self, namespace: str) -> None:
        _ip("netns", "add", namespace)
        self._namespaces.append(namespace)
        _ip("-n", namespace, "link", "set", "lo", "up")

    def add_host(self, name: str) -> TestHost:
        """A new namespace TAG-NAME with eth0 = 10.213.0.N/24, plugged into the switch."""
        if not _HOST_NAME.match(name):
            raise ValueError(f"host name {name!r}: use 1-31 lowercase letters, digits and '-'")
        if name in self.hosts:
            raise ValueError(f"host {name!r} already exists")
        index = len(self.hosts) + 1
        if index > MAX_HOSTS:
            raise ValueError(f"at most {MAX_HOSTS} hosts fit in {SUBNET}.0/{NETMASK_BITS}")
        namespace, port, address = f"{self.tag}-{name}", f"p{index}", f"{SUBNET}.{index}"
        self._add_namespace(namespace)
        # Created inside the switch namespace with the peer born straight into the host's: the root
        # namespace never holds either end, even for a moment.
        _ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", namespace)
        _ip("-n", self.switch, "link", "set", port, "master", "br0")
        _ip("-n", self.switch, "link", "set", port, "up")
        _ip("-n", namespace, "addr", "add", f"{address}/{NETMASK_BITS}", "dev", "eth0")
        _ip("-n", namespace, "link", "set", "eth0", "up")
        host = TestHost(self, name, namespace, address, port)
        self.hosts[name] = host
        return host

    def close(self) -> list[str]:
        """Kill every process, delete every namespace; return what could not be done (idempotent)."""
        errors: list[str] = []
        for process in self._processes:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    process.kill()
        for namespace in self._namespaces:  # grandchildren too, and anything started there some other way
            errors += [f"pid {pid} in {namespace} survived SIGKILL" for pid in _kill_namespace_processes(namespace)]
        for process in self._processes:
            try:
                process.wait(timeout=_PROCESS_EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                errors.append(f"pid {process.pid} did not exit after SIGKILL")
            for stream in (process.stdin, process.stdout, process.stderr):
                if stream is not None:
                    stream.close()
        self._processes.clear()
        # Hosts first: deleting a host namespace deletes its veth pair, both ends; the switch goes last.
        for namespace in reversed(self._namespaces):
            try:
                _ip("netns", "del", namespace)
            except NetnsError as exc:
                errors.append(str(exc))
        self._namespaces.clear()
        self.hosts.clear()
        return errors
