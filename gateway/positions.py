"""Queue positions of the jobs this gateway's event streams follow, refreshed for all of them at once.

Each event stream of a queued job needs its position every second or so. Asking Redis once per stream
would cost one stream scan per client per tick; the board asks once per tick for every tracked job.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

from common.redis_conn import UNAVAILABLE
from common.streams import JobStreams

logger = logging.getLogger(__name__)

Entry = tuple[str, str]  # (stream, entry id)


class PositionBoard:
    """Tracked (stream, entry) pairs and their latest positions, refreshed every `interval_s` while any are
    tracked: one scan per stream per refresh, whatever the number of followers."""

    def __init__(self, streams: JobStreams, interval_s: float = 1.0) -> None:
        self._streams = streams
        self._interval_s = interval_s
        self._tracked: Counter[Entry] = Counter()
        self._positions: dict[Entry, int] = {}
        self._wanted = asyncio.Event()
        self._stopped = False

    def track(self, entry: Entry) -> None:
        self._tracked[entry] += 1
        self._wanted.set()

    def untrack(self, entry: Entry) -> None:
        self._tracked[entry] -= 1
        if self._tracked[entry] <= 0:
            del self._tracked[entry]
            self._positions.pop(entry, None)

    def position(self, entry: Entry) -> int | None:
        """The position at the last refresh; None before the first one."""
        return self._positions.get(entry)

    def stop(self) -> None:
        """Make `run` return at its next turn. A cancellation alone is not enough: one that lands inside a Redis
        command can come out of redis-py as a connection error, or be undone by a timeout expiring at the same
        moment (Python 3.11's `asyncio.timeout` uncancels), and the app's shutdown would wait for ever."""
        self._stopped = True
        self._wanted.set()

    async def run(self) -> None:
        """Refresh until stopped; idle (no Redis traffic) while nothing is tracked."""
        while not self._stopped:
            if not self._tracked:
                self._wanted.clear()
                await self._wanted.wait()
                continue
            try:
                self._positions = await self._refresh()
            except (*UNAVAILABLE, OSError) as exc:
                logger.warning("queue positions not refreshed (%s)", exc)
            await asyncio.sleep(self._interval_s)

    async def _refresh(self) -> dict[Entry, int]:
        by_stream: dict[str, list[str]] = {}
        for stream, entry_id in self._tracked:
            by_stream.setdefault(stream, []).append(entry_id)
        positions: dict[Entry, int] = {}
        for stream, entry_ids in by_stream.items():
            found = await self._streams.positions(stream, entry_ids)
            positions.update(((stream, entry_id), at) for entry_id, at in found.items())
        return positions
