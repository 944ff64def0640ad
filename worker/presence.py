"""A worker's presence in the registry: what it serves, its state, how many jobs it has settled, kept alive by a
heartbeat so gateways route to it and its peers know it is there.

States: `warming` (loading and compiling, takes no job), `ready`, `busy` (any row of its batch is held: denoising,
or claimed and waiting; `rows` and `free_rows` say how much room is left), `draining` (a
stop was asked for: it says so until it leaves, so gateways and routing stop counting it even while it finishes
the jobs in hand). Leaving removes the entry at once; a worker that dies simply stops heartbeating and its entry
expires.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

from common.protocol import RequestKind, Size
from common.registry import Registry, WorkerInfo, WorkerState, kinds_of
from worker.config import WorkerConfig
from worker.delivery import REDIS_ERRORS
from worker.lora_source import LoraSource
from worker.pipeline_protocol import Engine
from worker.tiny_model import is_tiny_model

logger = logging.getLogger(__name__)


class Presence:
    """This worker's registry entry (`info`) and the heartbeat that refreshes it."""

    def __init__(
        self,
        config: WorkerConfig,
        registry: Registry,
        started_at: float | None = None,
        loras: LoraSource | None = None,
    ) -> None:
        self._config = config
        self._registry = registry
        self._loras = loras
        # The adapters the engine's device pool holds now: the engine's, once `loaded_by` names it.
        self._loaded: Callable[[], Sequence[str]] = lambda: ()
        self._draining = False
        self._store_refuses = False  # the image store refuses writes: claim nothing until it takes one
        self._busy = False
        self.info = WorkerInfo(
            id=config.worker_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            model=config.model,
            images_per_request=config.images_per_request,
            state="warming",
            **serving(config.sizes or (), config.max_steps, config.default_steps, ()),
            started_at=started_at or time.time(),
            random_weights=is_tiny_model(config.model),
            loras=list(loras.names) if loras is not None else [],
            max_loras=config.offered_max_loras if loras is not None else 0,
            image_input=config.takes_images,
            # Until the model's kinds are known (`model_runs`, from its config; else `warmed`, once it is loaded).
            request_kinds=kinds_of(config.takes_images),
        )

    async def announce(self, state: WorkerState, phase: str | None = None) -> None:
        """Take `state` (and the warm-up's `phase`, if warming) and publish the entry now, without waiting for
        the next heartbeat."""
        self._update(state=state, phase=phase)
        await self._registry.publish(self.info, self._config.heartbeat_ttl_s)

    def drain(self) -> None:
        """Say `draining` from now on, whatever the device does."""
        self._draining = True
        self._update(state="draining")

    def busy(self, busy: bool) -> None:
        """The device took work (`busy`) or has none left (`ready`); published with the next heartbeat."""
        self._busy = busy
        self._update(state="draining" if self._draining or self._store_refuses else "busy" if busy else "ready")

    def holding(self, rows: int, free_rows: int, busy: bool) -> None:
        """The batch has `rows`, `free_rows` of them free; `busy` while the engine holds any job. Published with the
        next heartbeat."""
        self._update(rows=rows, free_rows=free_rows)
        if self.info.state != "warming":
            self.busy(busy)

    def image_store_refuses(self, refuses: bool) -> None:
        """The image store refuses writes (say `draining`, so gateways and routing stop counting this worker)
        or takes them again."""
        self._store_refuses = refuses
        self.busy(self._busy)

    def model_runs(self, kinds: Sequence[RequestKind]) -> None:
        """The model runs `kinds` (read from its config before it is loaded): advertise those the engine takes,
        from the next publish on, while warming too."""
        self._update(request_kinds=advertised_kinds(kinds, self._config.takes_images))

    def warmed(self, engine: Engine, sizes: Sequence[Size]) -> None:
        """Describe what the warm `engine` serves: `sizes`, its devices, step range and schedulers, the kinds of
        request it runs (its model's, of those its engine takes), its rows and the most images one request may ask
        for."""
        pipeline = engine.pipeline
        default_steps = min(self._config.default_steps, pipeline.max_steps)
        self._update(
            images_per_request=engine.max_images,
            rows=engine.rows,
            free_rows=engine.free_rows(),
            device_kind=pipeline.device_kind,
            devices=pipeline.devices,
            **serving(sizes, pipeline.max_steps, default_steps, pipeline.schedulers),
            request_kinds=advertised_kinds(pipeline.request_kinds, self._config.takes_images),
            ready_at=time.time(),
        )

    def settled_one(self) -> None:
        """Count one more job settled."""
        self._update(jobs_done=self.info.jobs_done + 1)

    def metrics_on(self, port: int) -> None:
        """Name the port of this worker's /metrics, /healthz and /readyz."""
        self._update(metrics_port=port)

    def loaded_by(self, loaded: Callable[[], Sequence[str]]) -> None:
        """Publish what `loaded()` returns (the adapters in the device pool) as `loras_loaded`, from the next
        heartbeat on. It is called on the event loop."""
        self._loaded = loaded

    async def refresh_loras(self) -> None:
        """List the LoRA folder again and read the engine's pool: what the next publish says of adapters."""
        offered = list(await self._loras.rescan()) if self._loras is not None else []
        self._update(loras=offered, loras_loaded=list(self._loaded()))

    async def heartbeat(self) -> None:
        """Refresh the entry every `heartbeat_interval_s`, forever, with the adapters offered and loaded now; a Redis
        error skips one beat."""
        while True:
            await asyncio.sleep(self._config.heartbeat_interval_s)
            await self.refresh_loras()
            try:
                await self._registry.publish(self.info, self._config.heartbeat_ttl_s)
            except REDIS_ERRORS as exc:
                logger.warning("heartbeat failed (%s)", exc)

    async def leave(self) -> None:
        """Remove the entry now."""
        await self._registry.remove(self.info.id)

    def _update(self, **fields: Any) -> None:
        self.info = self.info.model_copy(update=fields)


def advertised_kinds(model_kinds: Sequence[RequestKind], takes_images: bool) -> list[RequestKind]:
    """The kinds of request a worker runs: those its model runs (`model_kinds`), from input images only where it
    `takes_images` (the row engine's)."""
    return [kind for kind in model_kinds if kind in kinds_of(takes_images)]


def serving(sizes: Sequence[Size], max_steps: int, default_steps: int, schedulers: Sequence[str]) -> dict[str, Any]:
    """The registry's description of what a worker serves: `sizes` at any step count from 1 to `max_steps`,
    with `schedulers`."""
    return {
        "sizes": list(sizes),
        "max_steps": max_steps,
        "default_steps": default_steps,
        "schedulers": list(schedulers),
    }
