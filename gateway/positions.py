"""Queue positions of the jobs this gateway's event streams follow, refreshed for all of them at once.

Each event stream of a queued job needs its position every second or so. Asking Redis once per stream
would cost one stream scan per client per tick; the board asks once per tick for every tracked job.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

from common.queue import JobQueue
from common.redis_conn import UNAVAILABLE

logger = logging.getLogger(__name__)


class PositionBoard:
    """Tracked stream entries and their latest positions, refreshed every `interval_s` while any are tracked."""

    def __init__(self, queue: JobQueue, interval_s: float = 1.0) -> None:
        self._queue = queue
        self._interval_s = interval_s
        self._tracked: Counter[str] = Counter()
        self._positions: dict[str, int] = {}
        self._wanted = asyncio.Event()

    def track(self, entry_id: str) -> None:
        self._tracked[entry_id] += 1
        self._wanted.set()

    def untrack(self, entry_id: str) -> None:
        self._tracked[entry_id] -= 1
        if self._tracked[entry_id] <= 0:
            del self._tracked[entry_id]
            self._positions.pop(entry_id, None)

    def position(self, entry_id: str) -> int | None:
        """The position at the last refresh; None before the first one."""
        return self._positions.get(entry_id)

    async def run(self) -> None:
        """Refresh until cancelled; idle (no Redis traffic) while nothing is tracked."""
        while True:
            if not self._tracked:
                self._wanted.clear()
                await self._wanted.wait()
            try:
                self._positions = await self._queue.positions(list(self._tracked))
            except (*UNAVAILABLE, OSError) as exc:
                logger.warning("queue positions not refreshed (%s)", exc)
            await asyncio.sleep(self._interval_s)
