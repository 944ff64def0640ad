"""Rate limits kept in Redis, so that every gateway replica shares them: one Lua script per check.

The algorithm is GCRA (the generic cell rate algorithm, a leaky bucket kept as one number): each bucket
stores the theoretical arrival time (TAT) of its next request. A request is allowed when it comes no more
than `burst` emission intervals before the TAT, which then moves one interval on. One key per bucket, one
round trip per check, the Redis server's clock for every replica, and the key expires once the bucket is
full again, so idle clients cost nothing.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import redis.asyncio as aioredis

from common.rediskeys import RedisKeys
from common.scripts import register

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_SPEC = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*([smh])\s*(?::\s*(\d+))?\s*$")


@dataclass(frozen=True)
class Rate:
    """`count` requests per `period_s` on average, with bursts of up to `burst` at once."""

    count: float
    period_s: float
    burst: int

    def __post_init__(self) -> None:
        if not (self.count > 0 and self.period_s > 0 and self.burst >= 1):
            raise ValueError("a rate needs a count > 0 and a burst >= 1")

    @classmethod
    def parse(cls, text: str) -> Rate | None:
        """`COUNT/UNIT[:BURST]` with UNIT s, m or h (`2/s:20`, `6/m`); `off` for no limit (None).

        The burst defaults to the count, at least 1.
        """
        if text.strip().lower() == "off":
            return None
        match = _SPEC.match(text)
        if match is None:
            raise ValueError(f"rate {text!r} is not COUNT/UNIT[:BURST] (UNIT s, m or h), e.g. 2/s:20, or off")
        count = float(match[1])
        burst = int(match[3]) if match[3] else max(1, math.ceil(count))
        return cls(count=count, period_s=_UNITS[match[2]], burst=burst)

    @property
    def interval_ms(self) -> float:
        """Milliseconds between two requests at the sustained rate."""
        return self.period_s * 1000 / self.count

    def describe(self) -> str:
        """In words, for error messages: `5 per second, bursts of 50`."""
        unit = {1.0: "second", 60.0: "minute", 3600.0: "hour"}[self.period_s]
        count = int(self.count) if self.count == int(self.count) else self.count
        return f"{count} per {unit}, bursts of {self.burst}"

    def __str__(self) -> str:
        unit = next(u for u, s in _UNITS.items() if s == self.period_s)
        count = int(self.count) if self.count == int(self.count) else self.count
        return f"{count}/{unit}:{self.burst}"


@dataclass(frozen=True)
class Decision:
    """The outcome of one check, with what the `RateLimit-*` and `Retry-After` headers say."""

    allowed: bool
    limit: int  # the burst: requests a full bucket allows at once
    remaining: int  # requests allowed right now, after this one
    retry_after_s: int  # whole seconds until a request would be allowed (0 when this one was)
    reset_s: int  # whole seconds until the bucket is full again

    def headers(self) -> dict[str, str]:
        headers = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_s),
        }
        if not self.allowed:
            headers["Retry-After"] = str(self.retry_after_s)
        return headers


class RateLimiter:
    """Checks buckets named `(bucket, identity)` against their rates; shared through Redis."""

    def __init__(self, redis: aioredis.Redis, keys: RedisKeys) -> None:
        self._keys = keys
        self._gcra = register(redis, "gcra", package="gateway")

    async def check(self, bucket: str, identity: str, rate: Rate) -> Decision:
        """Count one request against the bucket and say whether it is allowed.

        `identity` must never be a secret: it becomes part of a Redis key (use a digest prefix for keys). The
        rate is part of the bucket's name, so a changed limit starts afresh rather than inheriting a theoretical
        arrival time computed under the old one (an hour ahead, say, after a 1/h limit was raised).
        """
        allowed, wait_ms, remaining, full_ms = await self._gcra(
            keys=[self._keys.rate_limit(f"{bucket}@{rate}", identity)], args=[rate.interval_ms, rate.burst]
        )
        return Decision(
            allowed=bool(allowed),
            limit=rate.burst,
            remaining=int(remaining),
            retry_after_s=max(1, math.ceil(int(wait_ms) / 1000)) if not allowed else 0,
            reset_s=math.ceil(int(full_ms) / 1000),
        )
