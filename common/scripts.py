"""Lua scripts, kept as `.lua` files beside the package that calls them and registered with a client.

Each file opens with its contract (KEYS, ARGV, return value) as a comment block. A line `-- @include NAME`
stands for `lua/include/NAME.lua`: the code the scripts that end a job share, written once (Redis runs a
script as one text, so the loader puts it together). A script is read from the
installed package (importlib.resources, so a wheel works as well as a checkout) and registered with a
client once, by the object that calls it; redis-py then runs it by its SHA (EVALSHA) and loads it again by
itself after a Redis restart.
"""

from __future__ import annotations

import functools
import re
from importlib import resources
from importlib.resources.abc import Traversable

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

_INCLUDE = re.compile(r"^-- @include (\w+)\n", re.MULTILINE)


@functools.cache
def source(name: str, package: str = "common") -> str:
    """The text of `<package>/lua/<name>.lua` with its includes in place. Raises FileNotFoundError for an
    unknown script or include."""
    lua = resources.files(package) / "lua"
    text = (lua / f"{name}.lua").read_text(encoding="utf-8")
    return _INCLUDE.sub(lambda m: _body(lua / "include" / f"{m.group(1)}.lua"), text)


def _body(path: Traversable) -> str:
    """An include without its opening comment block (which says who includes it)."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    while lines and (lines[0].startswith("--") or not lines[0].strip()):
        lines.pop(0)
    return "".join(lines)


def register(redis: aioredis.Redis, name: str, package: str = "common") -> AsyncScript:
    """Register the script `<package>/lua/<name>.lua` with `redis`; call the result with `keys=` and `args=`."""
    return redis.register_script(source(name, package))
