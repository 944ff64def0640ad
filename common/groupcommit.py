"""Group commit: concurrent durable submits share one `WAIT` (or `WAITAOF`).

`WAIT` counts the writes of the connection it is sent on, and only those (redis.io/commands/wait: "all the
previous write commands sent in the context of the current connection"): a `WAIT` on one connection says
nothing of a script that another connection ran, nor of anything a connection ran on another server (the
old master, before a failover). So a batch is one pipeline on one connection: the scripts of every submit
waiting, then one `WAIT`. While a batch is out, new submits queue; when it returns they go out together as
the next. A submit is answered only with its own batch's `WAIT`, which covers its script because it came
before on the same connection. Under load a batch holds as many submits as arrived during one replication
round trip, so durable acceptance costs latency, not throughput.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError


@dataclass
class _Pending:
    """One submit waiting for a batch: the script's keys and arguments, when it came, where its answer goes."""

    keys: list[str]
    args: list[Any]
    since: float = field(default_factory=time.monotonic)
    answer: asyncio.Future[tuple[Any, bool]] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class GroupCommit:
    """Runs one script for concurrent callers in batches, each batch confirmed by one `WAIT 1` (`aof`:
    `WAITAOF 1 0`) on the connection that ran it.

    A caller gets the script's reply and whether it is confirmed. Its wait is bounded by `timeout_ms` from
    when it called: a batch that queued behind a slow one waits only for what is left of its oldest
    submit's time.
    """

    def __init__(self, redis: aioredis.Redis, script: AsyncScript, *, aof: bool, timeout_ms: int) -> None:
        self._redis = redis
        self._script = script
        self._aof = aof
        self._timeout_ms = timeout_ms
        self._queue: list[_Pending] = []
        self._committer: asyncio.Task[None] | None = None

    async def run(self, keys: list[str], args: list[Any]) -> tuple[Any, bool]:
        """Run the script with `keys` and `args` in the next batch; return its reply and whether a replica
        (or the disk) confirmed it. Raises what the script raised, or what the batch's connection raised."""
        pending = _Pending(keys, args)
        self._queue.append(pending)
        if self._committer is None or self._committer.done():  # one batch out at a time
            self._committer = asyncio.create_task(self._commit_all())
        return await pending.answer

    async def _commit_all(self) -> None:
        while batch := [pending for pending in self._queue if not pending.answer.done()]:
            self._queue = []
            try:
                answers = await self._commit(batch)
            except asyncio.CancelledError:  # the loop is closing: nobody is left waiting forever
                for pending in [*batch, *self._queue]:
                    pending.answer.cancel()
                raise
            except Exception as exc:  # the batch's connection failed: every submit in it hears why
                answers = [exc] * len(batch)
            for pending, answer in zip(batch, answers, strict=True):
                _answer(pending, answer)
        self._queue = []

    async def _commit(self, batch: list[_Pending]) -> list[tuple[Any, bool] | Exception]:
        """Send the batch; send it again if a script was missing (a failover's new master never loaded
        it: the pipeline loads it then). Running a submit twice is safe: the rerun answers as the first."""
        answers = await self._send(batch)
        if any(isinstance(answer, NoScriptError) for answer in answers):
            answers = await self._send(batch)
        return answers

    async def _send(self, batch: list[_Pending]) -> list[tuple[Any, bool] | Exception]:
        timeout_ms = self._timeout_ms - int((time.monotonic() - batch[0].since) * 1000)
        async with self._redis.pipeline(transaction=False) as pipe:
            for pending in batch:
                await self._script(keys=pending.keys, args=pending.args, client=pipe)
            if self._aof:
                pipe.execute_command("WAITAOF", 1, 0, max(1, timeout_ms))  # 0 would wait forever
            else:
                pipe.execute_command("WAIT", 1, max(1, timeout_ms))
            *replies, confirmed = await pipe.execute(raise_on_error=False)
        if isinstance(confirmed, ResponseError):  # e.g. WAIT sent to a replica: nothing here is confirmed
            raise confirmed
        held = int(confirmed[0] if self._aof else confirmed) >= 1
        return [reply if isinstance(reply, Exception) else (reply, held) for reply in replies]


def _answer(pending: _Pending, answer: tuple[Any, bool] | Exception) -> None:
    if pending.answer.done():  # its caller stopped waiting
        return
    if isinstance(answer, Exception):
        pending.answer.set_exception(answer)
    else:
        pending.answer.set_result(answer)
