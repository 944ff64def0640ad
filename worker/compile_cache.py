"""JAX's persistent compilation cache: a worker that starts again loads its executables instead of
compiling them.

The cache is a directory of serialized executables keyed by the program, the device kind and the
compiler version, so one directory can be shared by every worker on a host (and synced between hosts
of the same kind). JAX guards reads and writes with a file lock only when the cache has a size bound,
so a bound is always set: without it two workers starting at once could read each other's half-written
entries.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import jax

logger = logging.getLogger(__name__)

CacheEvent = Literal["hit", "miss"]
_EVENTS: dict[str, CacheEvent] = {
    "/jax/compilation_cache/cache_hits": "hit",
    "/jax/compilation_cache/cache_misses": "miss",
}


def enable_compilation_cache(directory: Path, max_bytes: int) -> None:
    """Keep every compiled executable in `directory`, least recently used first out past `max_bytes`.

    Call before the first compile. JAX's defaults skip executables that compile in under a second,
    which is every executable of a small model and the begin and finish parts of a large one: here
    everything is cached, since a restart should compile nothing.
    """
    directory.mkdir(parents=True, exist_ok=True)
    _set("jax_compilation_cache_dir", str(directory))
    _set("jax_compilation_cache_max_size", max_bytes)
    _set("jax_persistent_cache_min_compile_time_secs", 0.0)
    _set("jax_persistent_cache_min_entry_size_bytes", 0)
    logger.info("compilation cache: %s (at most %.1f GB)", directory, max_bytes / 1e9)


def disable_compilation_cache() -> None:
    """Compile everything at every start (for measuring cold starts, or a read-only filesystem)."""
    _set("jax_enable_compilation_cache", False)
    logger.info("compilation cache: off")


def on_cache_event(callback: Callable[[CacheEvent], None]) -> None:
    """Call `callback("hit")` or `callback("miss")` whenever JAX looks an executable up in the cache.

    The listener is process-wide and cannot be removed: register it once per process.
    """

    def listener(event: str, **_: Any) -> None:
        kind = _EVENTS.get(event)
        if kind is not None:
            callback(kind)

    jax.monitoring.register_event_listener(listener)


def _set(option: str, value: object) -> None:
    jax.config.update(option, value)  # type: ignore[no-untyped-call]
