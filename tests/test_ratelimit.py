"""Rate limits in Redis (gateway/ratelimit.py): GCRA on the server's clock, shared by every client of it."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from common.rediskeys import RedisKeys
from gateway.ratelimit import Rate, RateLimiter
from tests.support import RedisServer

KEYS = RedisKeys()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2/s:20", Rate(2, 1.0, 20)),
        ("6/m", Rate(6, 60.0, 6)),
        ("0.5/s", Rate(0.5, 1.0, 1)),
        (" 100 / h : 5 ", Rate(100, 3600.0, 5)),
        ("off", None),
        ("OFF", None),
    ],
)
def test_rates_parse(text: str, expected: Rate | None) -> None:
    assert Rate.parse(text) == expected


@pytest.mark.parametrize("text", ["", "5", "5/d", "-1/s", "0/s", "5/s:0", "1/s:x", "five/s"])
def test_malformed_rates_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        Rate.parse(text)


def test_rates_print_as_they_parse() -> None:
    assert str(Rate.parse("6/m:3")) == "6/m:3" and str(Rate.parse("0.5/s:2")) == "0.5/s:2"
    assert Rate(5, 1.0, 50).describe() == "5 per second, bursts of 50"


async def test_a_burst_is_allowed_then_refused_with_the_wait(redis_client: aioredis.Redis) -> None:
    limiter = RateLimiter(redis_client, KEYS)
    rate = Rate(1, 60.0, 3)  # one a minute, three at once
    decisions = [await limiter.check("submit", "192.0.2.1", rate) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0]
    refused = decisions[-1]
    assert 59 <= refused.retry_after_s <= 60  # whole seconds, rounded up
    assert refused.headers()["Retry-After"] == str(refused.retry_after_s)
    assert refused.headers()["RateLimit-Limit"] == "3" and "Retry-After" not in decisions[0].headers()
    # Each identity has its own bucket; the refused one did not consume anything.
    assert (await limiter.check("submit", "192.0.2.2", rate)).allowed
    assert await redis_client.ttl(KEYS.rate_limit("submit@1/m:3", "192.0.2.1")) > 0  # idle buckets expire


async def test_a_changed_rate_starts_a_fresh_bucket(redis_client: aioredis.Redis) -> None:
    limiter = RateLimiter(redis_client, KEYS)
    assert (await limiter.check("submit", "a", Rate(1, 3600.0, 1))).allowed
    assert not (await limiter.check("submit", "a", Rate(1, 3600.0, 1))).allowed
    assert (await limiter.check("submit", "a", Rate(100, 1.0, 100))).allowed  # raised: not held an hour


async def test_the_bucket_refills_at_the_rate(redis_client: aioredis.Redis) -> None:
    limiter = RateLimiter(redis_client, KEYS)
    rate = Rate(20, 1.0, 1)  # one every 50 ms
    assert (await limiter.check("read", "a", rate)).allowed
    assert not (await limiter.check("read", "a", rate)).allowed
    await asyncio.sleep(0.06)
    assert (await limiter.check("read", "a", rate)).allowed


async def test_replicas_share_one_budget_atomically(redis_server: RedisServer, redis_client: aioredis.Redis) -> None:
    """Two gateways (two clients) checking the same bucket at once never allow more than the burst."""
    replicas = [aioredis.Redis.from_url(redis_server.url(0)) for _ in range(2)]
    try:
        limiters = [RateLimiter(r, KEYS) for r in replicas]
        rate = Rate(1, 3600.0, 25)
        decisions = await asyncio.gather(*(limiters[k % 2].check("submit", "key-abc", rate) for k in range(100)))
    finally:
        for replica in replicas:
            await replica.aclose()
    assert sum(d.allowed for d in decisions) == 25
