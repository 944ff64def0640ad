"""A stand-in for the model: the real worker loop (claim, heartbeat, takeover, store) without JAX work.

`StandInPipeline` replaces `SDXLPipeline` in a real `Worker`: every shape compiles at once, a generation
reports each step (sleeping `step_s` per step) and returns grey images. `StandInEngine` replaces the row engine:
it holds the rows of several requests at once, sleeps `step_s` per step for all of them together, and its
requests join and leave at step boundaries. Run as a process it is a whole worker that the fault injector can
SIGKILL, SIGSTOP or cut off like any other:

    python -m testkit.standin --redis-url redis://127.0.0.1:PORT/0 --worker-id standin-1 --sizes 64x64 --max-steps 2

It takes the real worker's `--sizes` (default 64x64 here), `--max-steps`, `--default-steps`, `--engine` (`rows`,
the default: a `StandInEngine`; `request`: one request at a time), `--rows-per-device`, `--batch-policy` and the
LoRA flags (`--lora-dir`, `--max-loras`, ...), and serves what they say: it advertises the adapters of `--lora-dir`
as a real worker does, and applies none. With `--image-input` it advertises `image_input` and answers a job with input
images with the input image itself (resized to the job's size), read through the worker's own path
(worker/inputs.py, common/inputs.py `load_inputs`), so a test sees an upload come back.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from common.config import add_blob_store_argument
from common.input_images import resize_to
from common.logs import setup_logging
from common.protocol import REQUEST_KINDS, SCHEDULERS, ResolvedParams, Shape, Size
from worker.cli import add_serving_arguments, lora_settings
from worker.config import WorkerConfig
from worker.pipeline import CompileTimings, PipelineError, UnsupportedShape
from worker.pipeline_protocol import Engine, ImageInput, Pipeline, StepCallback, Tick
from worker.runner import serve

logger = logging.getLogger(__name__)
# What a stand-in serves without --sizes: it has no model whose native size to take.
STANDIN_SIZE = Size(width=64, height=64)


class StandInPipeline:
    """Stands in for SDXLPipeline: compiles nothing, sleeps `step_s` per denoising step, returns grey images.
    It serves the sizes of `shapes` at up to their most steps (or `max_steps`, when more), every scheduler."""

    device_kind = "stand-in"
    devices = 4
    schedulers = SCHEDULERS
    request_kinds = REQUEST_KINDS

    def __init__(self, shapes: tuple[Shape, ...], step_s: float = 0.0, images: int = 4, max_steps: int = 0) -> None:
        self._sizes = tuple(dict.fromkeys(shape.size for shape in shapes))
        self.max_steps = max([max_steps, *(shape.steps for shape in shapes)])
        self._step_s = step_s
        self._images = images

    def default_sizes(self) -> tuple[Size, ...]:
        return self._sizes

    def compile(self, size: Size) -> CompileTimings:
        return CompileTimings(lower_s=0.0, compile_s=0.0, warmup_s=0.0)

    def check(self, shape: Shape) -> None:
        """Raise UnsupportedShape for a shape it does not serve."""
        if shape.size not in self._sizes or not 1 <= shape.steps <= self.max_steps:
            raise UnsupportedShape(f"shape {shape} is not served here")

    def generate(self, params: ResolvedParams, on_step: Callable[[int], None] | None = None) -> np.ndarray:
        shape = params.shape
        self.check(shape)
        for step in range(1, shape.steps + 1):
            time.sleep(self._step_s)
            if on_step is not None:
                on_step(step)
        return np.full((self._images, shape.height, shape.width, 3), 128, dtype=np.uint8)


@dataclass
class _Request:
    key: str
    params: ResolvedParams
    on_step: StepCallback
    step: int = 0


class StandInEngine:
    """Stands in for the row engine over a `StandInPipeline`: `rows_per_device` rows per device, filled with the
    images of several requests in arrival order. A step sleeps `step_s` once for all its rows; requests join (when
    their rows fit) and leave (finished, stopped by their `on_step`, or cancelled) at step boundaries."""

    def __init__(self, pipeline: StandInPipeline, rows_per_device: int, step_s: float, max_images: int = 4) -> None:
        self._pipeline = pipeline
        self._rows = rows_per_device * pipeline.devices
        self._step_s = step_s
        self._max_images = max_images
        self._waiting: list[_Request] = []
        self._running: list[_Request] = []
        self._cancelled: set[str] = set()
        self._inputs: dict[str, ImageInput] = {}
        self._lock = threading.Lock()

    @property
    def pipeline(self) -> Pipeline:
        return self._pipeline

    @property
    def rows(self) -> int:
        return self._rows

    @property
    def max_images(self) -> int:
        return self._max_images

    def free_rows(self) -> int:
        with self._lock:
            return self._rows - sum(r.params.n for r in [*self._waiting, *self._running])

    @property
    def busy(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._running)

    def compile(self, size: Size, /) -> CompileTimings:
        return self._pipeline.compile(size)

    def admit(
        self, key: str, params: ResolvedParams, on_step: StepCallback, *, image: ImageInput | None = None
    ) -> None:
        """Queue a request; one with an input image will answer with that image (resized to its size)."""
        self._pipeline.check(params.shape)
        if params.n > self._max_images:
            raise PipelineError(f"n={params.n}: this worker makes at most {self._max_images} images per request")
        with self._lock:
            self._cancelled.discard(key)
            self._waiting.append(_Request(key, params, on_step))
            if image is not None:
                self._inputs[key] = image

    def cancel(self, key: str) -> None:
        with self._lock:
            self._cancelled.add(key)
            self._inputs.pop(key, None)

    def close(self) -> None:
        """Nothing to release."""

    def _images(self, request: _Request) -> np.ndarray:
        """A finished request's images: grey, or its input image resized to its size, once per image."""
        shape, n = request.params.shape, request.params.n
        with self._lock:
            image = self._inputs.pop(request.key, None)
        if image is None:
            return np.full((n, shape.height, shape.width, 3), 128, np.uint8)
        return np.repeat(resize_to(image.image, shape.width, shape.height)[None], n, axis=0)

    def step(self) -> Tick:
        """One step of every running request's rows, after the waiting ones that fit joined."""
        running = self._boundary()
        tick = Tick()
        if not running:
            return tick
        time.sleep(self._step_s)
        for request in running:
            request.step += 1
            try:
                request.on_step(request.step)
            except Exception as exc:
                tick.stopped.append((request.key, exc))
                continue
            if request.step >= request.params.shape.steps:
                tick.finished.append((request.key, self._images(request)))
        ended = {key for key, _ in tick.stopped} | {key for key, _ in tick.finished}
        with self._lock:
            self._running = [r for r in self._running if r.key not in ended]
        return tick

    def _boundary(self) -> list[_Request]:
        """Drop the cancelled requests, let the waiting ones that fit join; the rows that run this step."""
        with self._lock:
            self._waiting = [r for r in self._waiting if r.key not in self._cancelled]
            self._running = [r for r in self._running if r.key not in self._cancelled]
            self._cancelled.clear()
            free = self._rows - sum(r.params.n for r in self._running)
            while self._waiting and (self._waiting[0].params.n <= free or not self._running):
                request = self._waiting.pop(0)
                self._running.append(request)
                free -= request.params.n
            return list(self._running)


def with_step_range(shapes: Sequence[Shape], max_steps: int) -> tuple[Shape, ...]:
    """`shapes` (the first stays the default), then their first size at `max_steps`: what a worker that
    compiled these shapes publishes then serves every step count up to `max_steps` (when it is the most)."""
    extra = [Shape(width=shapes[0].width, height=shapes[0].height, steps=max_steps)] if shapes and max_steps else []
    return tuple(dict.fromkeys([*shapes, *extra]))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m testkit.standin", description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--worker-id", required=True)
    add_serving_arguments(parser)
    parser.add_argument("--step-s", type=float, default=0.05, help="seconds per denoising step")
    parser.add_argument("--heartbeat-interval", type=float, default=0.5)
    parser.add_argument("--heartbeat-ttl", type=float, default=3.0)
    parser.add_argument("--max-deliveries", type=int, default=3)
    parser.add_argument("--max-input-retries", type=int, default=WorkerConfig.max_input_retries)
    parser.add_argument("--key-prefix", default="sdxl")
    parser.add_argument(
        "--image-input", action="store_true", help="advertise image_input and answer with the input image"
    )
    add_blob_store_argument(parser, WorkerConfig.blob_store)
    parser.add_argument("--log-level", default="info")
    return parser


def config_of(args: argparse.Namespace) -> WorkerConfig:
    return WorkerConfig(
        redis_url=args.redis_url,
        model="stand-in",
        sizes=args.sizes or (STANDIN_SIZE,),
        max_steps=args.max_steps,
        default_steps=min(WorkerConfig.default_steps, args.max_steps)
        if args.default_steps is None
        else args.default_steps,
        key_prefix=args.key_prefix,
        worker_id=args.worker_id,
        heartbeat_interval_s=args.heartbeat_interval,
        heartbeat_ttl_s=args.heartbeat_ttl,
        max_deliveries=args.max_deliveries,
        max_input_retries=args.max_input_retries,
        engine=args.engine,
        rows_per_device=args.rows_per_device,
        batch_policy=args.batch_policy,
        metrics_host="127.0.0.1",
        compile_cache_dir=None,
        image_input=args.image_input,
        blob_store=args.blob_store,
        **lora_settings(args),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.log_level, "text")
    config = config_of(args)

    def load() -> Pipeline | Engine:
        shapes = tuple(
            Shape(width=size.width, height=size.height, steps=config.max_steps) for size in config.sizes or ()
        )
        pipeline = StandInPipeline(shapes, args.step_s)
        if config.engine == "request":
            return pipeline
        return StandInEngine(pipeline, config.rows_per_device, args.step_s, config.images_per_request)

    status = asyncio.run(serve(config, load_pipeline=load))
    logging.shutdown()
    sys.stdout.flush()
    os._exit(status)  # as the real worker does: no thread may hold the process open


if __name__ == "__main__":
    sys.exit(main())
