"""A replicated Redis watched by Sentinel, as real local processes: a primary, a replica, three sentinels.

For tests and benchmarks of failover: `start_sentinel_group` starts them on free loopback ports and returns
once the replica is in sync and every sentinel knows the replica and the other sentinels (so a failover can
be agreed on). `kill_primary` SIGKILLs the primary; `switched` is awaited for the sentinels' `+switch-master`
announcement of the promoted replica.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from sdxl_serve.processes import (
    ProcessError,
    RedisOptions,
    RedisServer,
    free_port,
    signal_group,
    spawn,
    start_redis_server,
    stop,
)

logger = logging.getLogger(__name__)

SERVICE = "sdxl"
SENTINELS = 3
QUORUM = 2
# How long a silent primary is taken to be down. Short, so a test's failover is over in a few seconds.
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000
SETTLE_TIMEOUT_S = 30.0
HOST = "127.0.0.1"  # every server binds it: clients name it rather than `localhost`, which may resolve elsewhere
DEFAULT_REPLICA_PRIORITY = 100
_MONITOR_LINE = b"+monitor master"


class ReplicationLink:
    """A TCP relay the replica replicates through, so a benchmark can make the replica fall behind: while held,
    what the primary sends is kept here instead of delivered, and lost with the primary if it dies then."""

    def __init__(self, primary_port: int) -> None:
        self.primary_port = primary_port
        self.port = 0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def hold(self) -> None:
        """Stop delivering the primary's stream to the replica (the replica falls behind)."""
        self._flowing.clear()

    def cut(self) -> None:
        """Drop every connection, and with them whatever was held back."""
        for task in self._tasks:
            task.cancel()
        if self._server is not None:
            self._server.close()

    async def _relay(self, replica_r: asyncio.StreamReader, replica_w: asyncio.StreamWriter) -> None:
        primary_r, primary_w = await asyncio.open_connection(HOST, self.primary_port)
        pumps = [self._pump(replica_r, primary_w, held=False), self._pump(primary_r, replica_w, held=True)]
        for pump in pumps:
            task = asyncio.create_task(pump)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, held: bool) -> None:
        try:
            while data := await reader.read(65536):
                if held:
                    await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


@dataclass
class SentinelGroup:
    """A primary, a replica and the sentinels that watch them; `url()` is what clients connect with."""

    primary: RedisServer
    replica: RedisServer
    sentinels: list[asyncio.subprocess.Process]
    sentinel_ports: list[int]
    directory: Path
    service: str = SERVICE
    killed_at: float | None = None
    link: ReplicationLink | None = None
    _switch: asyncio.Task[tuple[str, int]] | None = field(default=None, repr=False)

    def url(self, db: int = 0) -> str:
        hosts = ",".join(f"{HOST}:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.service}/{db}"

    async def master_port(self) -> int:
        """The port of the server the first sentinel takes to be the master now."""
        client = aioredis.Redis(host=HOST, port=self.sentinel_ports[0])
        try:
            address: Any = await client.sentinel_get_master_addr_by_name(self.service)
            return int(address[1])
        finally:
            await client.aclose()

    async def hold_replica(self) -> None:
        """Hold the relayed replica back (see ReplicationLink.hold). The sentinels repoint a replica whose master
        address is not the primary's at the primary itself, FAILOVER_TIMEOUT_MS after they found it: from then
        on the relay carries nothing, so holding it would hold nothing. That is an error here, not a silent
        benchmark of an in-step replica."""
        assert self.link is not None, "start the group with relayed=True"
        client = aioredis.Redis(host=HOST, port=self.replica.port)
        try:
            upstream = (await client.info("replication")).get("master_port")
        finally:
            await client.aclose()
        if upstream != self.link.port:
            raise ProcessError(
                f"the replica replicates from port {upstream}, not through the relay ({self.link.port}): the "
                f"sentinels repointed it (+fix-slave-config); hold it within {FAILOVER_TIMEOUT_MS} ms of the start"
            )
        self.link.hold()

    async def kill_primary(self) -> None:
        """SIGKILL the primary (no shutdown, no last write to the replica) after subscribing to the sentinels'
        switch announcement, so it cannot be missed."""
        self._switch = asyncio.create_task(self._await_switch(await self._subscribed()))
        await asyncio.sleep(0)
        self.killed_at = time.monotonic()
        signal_group(self.primary.process.pid, signal.SIGKILL)
        await self.primary.process.wait()

    async def rejoin(self) -> None:
        """Start the killed primary again, on its port and data directory, as a replica of the new master
        (as an operator's restart would, and as the sentinels would reconfigure it); return once in sync.

        It comes back empty, and until its first sync is done it must not be promoted: a replica that never
        had a link reports no link-down time, so Sentinel would take it if the master failed meanwhile, and
        the data with it. It starts with replica-priority 0 and gets the default back once in sync.
        With `--durable-accept replica`, a cluster takes jobs again only once a replica is back."""
        new_master = self.replica
        extra = ("--replicaof", HOST, str(new_master.port), "--replica-priority", "0")
        restarted = await start_redis_server(self.primary.directory, RedisOptions(port=self.primary.port, extra=extra))
        self.primary, self.replica = new_master, restarted
        await _in_sync(self.primary.port, restarted.port)
        client = aioredis.Redis(host=HOST, port=restarted.port)
        try:
            await client.config_set("replica-priority", DEFAULT_REPLICA_PRIORITY)
        finally:
            await client.aclose()

    async def switched(self, timeout_s: float = SETTLE_TIMEOUT_S) -> tuple[str, int]:
        """The new master's address, once the sentinels announce it."""
        assert self._switch is not None, "kill_primary first"
        async with asyncio.timeout(timeout_s):
            return await self._switch

    async def _subscribed(self) -> aioredis.client.PubSub:
        client = aioredis.Redis(host=HOST, port=self.sentinel_ports[0])
        pubsub = client.pubsub()
        await pubsub.subscribe("+switch-master")
        return pubsub

    async def _await_switch(self, pubsub: aioredis.client.PubSub) -> tuple[str, int]:
        try:
            async for message in pubsub.listen():
                if message["type"] == "message":
                    # "<service> <old-ip> <old-port> <new-ip> <new-port>"
                    parts = message["data"].decode().split()
                    if parts[0] == self.service:
                        return parts[3], int(parts[4])
            raise ProcessError("the sentinel's announcements ended")
        finally:
            await pubsub.aclose()

    async def close(self) -> None:
        """Stop every process and remove the data directory."""
        if self._switch is not None:
            self._switch.cancel()
        if self.link is not None:
            self.link.cut()
        await stop([*self.sentinels, self.primary.process, self.replica.process], timeout_s=10)
        shutil.rmtree(self.directory, ignore_errors=True)


async def start_sentinel_group(
    directory: Path, options: RedisOptions | None = None, *, relayed: bool = False
) -> SentinelGroup:
    """Start a primary, a replica of it and three sentinels in `directory`; return once a failover can happen.

    `options` apply to both data servers (`appendonly`, `extra`); their ports are always free ones. With
    `relayed`, the replica replicates through a `ReplicationLink` (the group's `link`) that can hold it back.
    """
    options = options or RedisOptions()
    primary = await _data_server(directory / "primary", options)
    link = ReplicationLink(primary.port) if relayed else None
    if link is not None:
        await link.start()
    upstream = link.port if link is not None else primary.port
    replica = await _data_server(directory / "replica", options, "--replicaof", HOST, str(upstream))
    await _in_sync(primary.port, replica.port, upstream)
    ports = [free_port() for _ in range(SENTINELS)]
    sentinels = [await _sentinel(directory / f"sentinel-{i}", port, primary.port) for i, port in enumerate(ports)]
    await _settled(ports)
    return SentinelGroup(primary, replica, sentinels, ports, directory, link=link)


async def _data_server(directory: Path, options: RedisOptions, *extra: str) -> RedisServer:
    directory.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (a local directory, made once at start)
    return await start_redis_server(
        directory, RedisOptions(appendonly=options.appendonly, extra=(*options.extra, *extra))
    )


async def _sentinel(directory: Path, port: int, primary_port: int) -> asyncio.subprocess.Process:
    directory.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (a local directory, made once at start)
    conf = directory / "sentinel.conf"  # a sentinel rewrites its own file: one per sentinel
    conf.write_text(
        "\n".join([
            f"port {port}",
            f"bind {HOST}",
            f"dir {directory}",
            f"sentinel monitor {SERVICE} {HOST} {primary_port} {QUORUM}",
            f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}",
            f"sentinel parallel-syncs {SERVICE} 1",
            "",
        ])
    )  # fmt: skip
    binary = shutil.which("redis-sentinel") or shutil.which("redis-server")
    if binary is None:
        raise ProcessError("redis-sentinel not found: install it (apt-get install redis-sentinel)")
    argv = [binary, str(conf)] if binary.endswith("sentinel") else [binary, str(conf), "--sentinel"]
    process = await spawn(*argv, stdout=asyncio.subprocess.PIPE)
    assert process.stdout is not None
    async for line in process.stdout:  # it says when it monitors the primary: no polling
        if _MONITOR_LINE in line:
            asyncio.get_running_loop().create_task(_drain(process.stdout))
            return process
    await process.wait()
    raise ProcessError(f"redis-sentinel exited ({process.returncode}) before it monitored the primary")


async def _in_sync(master_port: int, replica_port: int, upstream_port: int | None = None) -> None:
    """Until the replica on `replica_port` finished its sync with the master on `master_port`: the master lists
    it online and the replica says its link (to `upstream_port`, the master's unless it goes through a relay)
    is up. Past SETTLE_TIMEOUT_S, a ProcessError says what each of them reports."""
    master, replica = aioredis.Redis(host=HOST, port=master_port), aioredis.Redis(host=HOST, port=replica_port)
    upstream = upstream_port or master_port
    try:
        async with asyncio.timeout(SETTLE_TIMEOUT_S):
            while True:  # replication has no event to await from outside
                ours, theirs = await master.info("replication"), await replica.info("replication")
                if _lists_online(ours, replica_port) and _linked(theirs, upstream):
                    return
                await asyncio.sleep(0.05)
    except TimeoutError:
        ours, theirs = await master.info("replication"), await replica.info("replication")
        raise ProcessError(
            f"replica {replica_port} not in sync with {master_port} after {SETTLE_TIMEOUT_S:.0f} s: the master says "
            f"{_fields(ours, 'role', 'connected_slaves', 'slave0')}; the replica says "
            f"{_fields(theirs, 'role', 'master_port', 'master_link_status', 'master_sync_in_progress')}"
        ) from None
    finally:
        await master.aclose()
        await replica.aclose()


def _lists_online(info: dict[str, Any], port: int) -> bool:
    """Whether a master's INFO lists the replica on `port` as online (its first full sync done)."""
    replicas = [value for key, value in info.items() if key.startswith("slave") and isinstance(value, dict)]
    return any(replica.get("port") == port and replica.get("state") == "online" for replica in replicas)


def _linked(info: dict[str, Any], upstream_port: int) -> bool:
    """Whether a replica's INFO says it replicates from `upstream_port` with its link up."""
    return info.get("master_port") == upstream_port and info.get("master_link_status") == "up"


def _fields(info: dict[str, Any], *names: str) -> str:
    return ", ".join(f"{name}={info.get(name)}" for name in names)


async def _settled(ports: list[int]) -> None:
    """Until every sentinel knows the replica and the other sentinels (they meet through hello messages,
    every 2 s): before that, a failover could not reach its quorum."""
    clients = [aioredis.Redis(host=HOST, port=port) for port in ports]
    try:
        async with asyncio.timeout(SETTLE_TIMEOUT_S):
            for client in clients:
                await _until_knows_all(client)
    finally:
        for client in clients:
            await client.aclose()


async def _until_knows_all(sentinel: aioredis.Redis) -> None:
    while True:
        replicas: Any = await sentinel.sentinel_slaves(SERVICE)
        others: Any = await sentinel.sentinel_sentinels(SERVICE)
        if replicas and len(others) >= SENTINELS - 1:
            return
        await asyncio.sleep(0.1)


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass
