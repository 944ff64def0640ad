"""The device: one thread that runs the engine's work (its steps, admissions and compiles), one call at a time,
off the event loop, so heartbeats and Redis I/O keep flowing while the accelerator is busy.

Warm-up loads the engine there, then compiles and warms every size it is to serve (every batch shape of each),
recording how start-up time splits into phases; only then does the worker claim jobs.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from common.protocol import Size
from worker.metrics import WorkerMetrics
from worker.pipeline_protocol import Engine

T = TypeVar("T")

logger = logging.getLogger(__name__)


async def _quiet(phase: str) -> None:
    """The default listener of warm-up phases: nobody."""


class Device:
    """The accelerator, behind its own thread; `engine` is set once warm."""

    def __init__(self, metrics: WorkerMetrics) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="device")
        self._metrics = metrics
        self.engine: Engine | None = None
        self._loaded: Engine | None = None  # from the load on: closed with the device even if warm-up failed

    async def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the device thread, after whatever it is running now."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn)

    async def warm_up(
        self,
        load: Callable[[], Engine],
        sizes: Sequence[Size] | None,
        phases: dict[str, float],
        on_phase: Callable[[str], Awaitable[None]] = _quiet,
    ) -> Sequence[Size]:
        """Load the engine, then compile and warm `sizes` (the pipeline's defaults when None); adds the
        seconds of each phase to `phases`. `on_phase` hears, before each, what a person now waits for
        ("loading weights", "compiling 1216x832 (3/9)"). Returns the sizes served."""
        await on_phase("loading weights")
        started = time.perf_counter()
        engine = self._loaded = await self.call(load)
        pipeline = engine.pipeline
        phases["load"] = time.perf_counter() - started
        logger.info("weights loaded in %.1fs", phases["load"])
        served = sizes or pipeline.default_sizes()
        for index, size in enumerate(served, start=1):
            await on_phase(f"compiling and warming {size} ({index}/{len(served)})")
            await self._compile(engine, size, phases)
        for phase, seconds in phases.items():
            self._metrics.startup_seconds.labels(phase).set(seconds)
        self._metrics.devices.labels(pipeline.device_kind).set(pipeline.devices)
        self.engine = engine
        return served

    def close(self) -> None:
        """Close the engine (its threads: the row engine's adapter reader), then the device thread."""
        if self._loaded is not None:
            self._loaded.close()
        self._thread.shutdown(wait=False)

    async def _compile(self, engine: Engine, size: Size, phases: dict[str, float]) -> None:
        timings = await self.call(functools.partial(engine.compile, size))
        logger.info(
            "%s compiled in %.1fs, warmed up in %.1fs", size, timings.lower_s + timings.compile_s, timings.warmup_s
        )
        for phase, seconds in (
            ("lower", timings.lower_s),
            ("compile", timings.compile_s),
            ("warmup", timings.warmup_s),
        ):
            self._metrics.compile_seconds.labels(str(size), phase).set(seconds)
            phases[phase] = phases.get(phase, 0.0) + seconds
