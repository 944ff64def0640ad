"""A worker's own HTTP port: Prometheus `/metrics`, `/healthz` (alive) and `/readyz` (warm and claiming).

The port is `--metrics-port` (0: any free port); the port in use is published in the worker's registry
entry, so `sdxl-serve status` and service discovery can find it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Tiny-model CPU generations take about a second; SDXL at 1024x1024 takes seconds on an accelerator.
SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 1.5, 2, 2.5, 3, 4, 5, 7.5, 10, 15, 20, 30, 60, 120)


def _safety_metric(registry: CollectorRegistry) -> Counter:
    """Images the safety checker looked at, by verdict (`flagged`: replaced and marked nsfw; `passed`)."""
    return Counter(
        "sdxl_worker_images_checked", "Images the safety checker looked at, by verdict", ["verdict"], registry=registry
    )


class WorkerMetrics:
    """Every metric a worker exports, on its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.jobs = Counter("sdxl_worker_jobs", "Jobs settled by this worker, by outcome", ["outcome"], registry=r)
        self.generate_seconds = Histogram(
            "sdxl_worker_generate_seconds",
            "Pipeline call per job (device to host included)",
            ["shape"],
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.encode_seconds = Histogram(
            "sdxl_worker_encode_seconds", "Encoding a job's images", ["format"], buckets=SECONDS_BUCKETS, registry=r
        )
        self.compile_seconds = Gauge(
            "sdxl_worker_compile_seconds", "Start-up work per shape, by phase", ["shape", "phase"], registry=r
        )
        self.start_to_ready_seconds = Gauge(
            "sdxl_worker_start_to_ready_seconds", "Process start to ready (load, compile, warm-up)", registry=r
        )
        self.startup_seconds = Gauge(
            "sdxl_worker_startup_seconds",
            "Process start to ready by phase, summed over shapes: init (imports, Redis), load, lower, compile, warmup",
            ["phase"],
            registry=r,
        )
        self.compile_cache = Counter(
            "sdxl_worker_compile_cache",
            "Executable lookups in the persistent compilation cache, by result (hit or miss)",
            ["result"],
            registry=r,
        )
        self.devices = Gauge("sdxl_worker_devices", "Local accelerator devices in use", ["kind"], registry=r)
        self.steps = Counter(
            "sdxl_worker_denoising_steps", "Denoising steps finished on the devices (with step progress)", registry=r
        )
        self.reclaims = Counter("sdxl_worker_reclaims", "Jobs this worker took over from dead workers", registry=r)
        self._add_batch_metrics()
        self._add_image_store_metrics()
        self.images_checked = _safety_metric(r)

    def _add_batch_metrics(self) -> None:
        """What the device's batch holds and what its UNet samples were spent on."""
        r = self.registry
        self.unet_samples = Counter(
            "sdxl_worker_unet_samples",
            "UNet samples run on the devices, by class: guided rows (two per step), unguided rows (one), padding "
            "(run for no row: an engine bucket's empty places, or the images of a batch a request did not ask for)",
            ["class"],
            registry=r,
        )
        self.busy = Gauge("sdxl_worker_busy", "1 while a job is on the devices", registry=r)
        self.rows_in_use = Gauge(
            "sdxl_worker_rows_in_use",
            "Rows of the batch that jobs hold (denoising, or claimed and waiting)",
            registry=r,
        )

    def _add_image_store_metrics(self) -> None:
        """Whether the image store takes writes, and the jobs failed because it did not for too long."""
        self.image_store_failures = Counter(
            "sdxl_worker_image_store_failures",
            "Jobs failed because the image store refused their images for --blob-store-timeout",
            registry=self.registry,
        )
        self.image_store_writable = Gauge(
            "sdxl_worker_image_store_writable",
            "0 while the image store refuses writes, or after it failed a read of input images (the worker is not "
            "claiming), else 1",
            registry=self.registry,
        )
        self.image_store_writable.set(1)


def metrics_app(metrics: WorkerMetrics, ready: Callable[[], str | None]) -> web.Application:
    """The worker's HTTP app; `ready()` returns None when ready, else why not."""

    async def exposition(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        reason = ready()
        if reason is not None:
            return web.json_response({"error": {"code": "not_ready", "message": reason, "field": None}}, status=503)
        return web.json_response({"status": "ready"})

    app = web.Application()
    app.router.add_get("/metrics", exposition)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def start_server(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve `app`; returns the runner (to clean up) and the port bound (useful when `port` is 0)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = port
    server = site._server  # aiohttp exposes the bound sockets only here
    if server is not None and getattr(server, "sockets", None):
        bound = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
    logger.info("metrics and health on http://%s:%d/metrics", host, bound)
    return runner, bound
