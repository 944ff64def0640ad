"""Limits on what a caller may ask: each route's access class, and the answer to a full queue.

Each route declares its `Access` in the route table: `submit` routes create jobs, `read` routes look at
them, and routes with neither (health, readiness, metrics, the OpenAPI document, the page) are open and
never limited. `protection_middleware` (gateway/middlewares.py) enforces them: body size by
Content-Length (413, nothing read), the caller (gateway/auth.py: 401/403), then its rate in Redis
(gateway/ratelimit.py: 429 with Retry-After).

Backpressure, the other half, is checked atomically where a job is queued (common/jobstore.py); the
Retry-After of a full queue comes from the cluster's observed throughput (`ThroughputMeter`).
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from aiohttp import web

from common.jobstore import QueueFull
from gateway.errors import ApiError
from gateway.ratelimit import Decision

RouteKind = Literal["submit", "read"]
RATE_DECISION = web.RequestKey("rate_decision", Decision)
# A full queue's Retry-After: from throughput when some was seen, else this; never more than the cap.
QUEUE_FULL_RETRY_S = 5
MAX_RETRY_AFTER_S = 60


@dataclass(frozen=True)
class Access:
    """How a route is protected. `kind` None: open to everyone and never limited."""

    kind: RouteKind | None = None
    public: bool = False  # the demo page uses it: open without a key under --public-demo
    signed: bool = False  # open without a key to a URL that bears a signature (gateway/signed_urls.py)
    images: bool = False  # it takes input images: its body may be up to --max-image-body-bytes


OPEN = Access()


class ThroughputMeter:
    """Jobs completed per second over the last `window_s`, from the completions every gateway hears."""

    def __init__(self, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._window_s = window_s
        self._clock = clock
        self._started = clock()
        self._times: collections.deque[float] = collections.deque(maxlen=10_000)

    def record(self) -> None:
        self._times.append(self._clock())

    def per_second(self) -> float:
        now = self._clock()
        while self._times and self._times[0] < now - self._window_s:
            self._times.popleft()
        span = min(self._window_s, now - self._started)
        return len(self._times) / span if span > 0 else 0.0


def queue_full(exc: QueueFull, meter: ThroughputMeter) -> ApiError:
    """429 for a submit to a full stream, with the seconds until a place is likely to be free."""
    rate = meter.per_second()
    waiting = exc.depth - exc.max_depth + 1  # completions needed before this job would fit
    retry = math.ceil(waiting / rate) if rate > 0 else QUEUE_FULL_RETRY_S
    retry = min(max(retry, 1), MAX_RETRY_AFTER_S)
    return ApiError(
        429,
        "queue_full",
        f"the queue is full ({exc.depth} jobs); retry in {retry} s",
        headers={"Retry-After": str(retry)},
    )
