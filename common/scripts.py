"""Lua scripts, kept as `.lua` files beside the package that calls them and registered with a client.

Each file opens with its contract (KEYS, ARGV, return value) as a comment block. A script is read from the
installed package (importlib.resources, so a wheel works as well as a checkout) and registered with a
client once, by the object that calls it; redis-py then runs it by its SHA (EVALSHA) and loads it again by
itself after a Redis restart.
"""

from __future__ import annotations

import functools
from importlib import resources

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript


@functools.cache
def source(name: str, package: str = "common") -> str:
    """The text of `<package>/lua/<name>.lua`. Raises FileNotFoundError for an unknown script."""
    return (resources.files(package) / "lua" / f"{name}.lua").read_text(encoding="utf-8")


def register(redis: aioredis.Redis, name: str, package: str = "common") -> AsyncScript:
    """Register the script `<package>/lua/<name>.lua` with `redis`; call the result with `keys=` and `args=`."""
    return redis.register_script(source(name, package))
