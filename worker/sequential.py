"""One request at a time: an `Engine` over any `Pipeline`, the way a worker ran before the engine.

`RequestAtATime` holds at most one request: it claims room only while it holds none, and `step` runs the whole
request with `pipeline.generate`, which makes the pipeline's full batch; the request gets the first `n` of its
images. It is `--engine request` and the baseline of the engine's benchmark.
"""

from __future__ import annotations

import collections
import logging
import threading

from typing_extensions import TypeIs

from common.protocol import ResolvedParams, Size
from worker.pipeline import CompileTimings, PipelineError, guided
from worker.pipeline_protocol import Engine, ImageInput, Pipeline, StepCallback, Tick

logger = logging.getLogger(__name__)


class _Dropped(Exception):
    """Raised at a step boundary of a request cancelled through `cancel`: it leaves without a result."""


class _Stopped(Exception):
    """Carries what a request's own `on_step` raised out of the pipeline's step loop."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class RequestAtATime:
    """An engine of `pipeline` that runs one request at a time; `images` is how many images each generation makes
    (its rows, and the most a request may ask for)."""

    def __init__(self, pipeline: Pipeline, images: int) -> None:
        self._pipeline = pipeline
        self._images = images
        self._waiting: collections.deque[tuple[str, ResolvedParams, StepCallback]] = collections.deque()
        self._running: str | None = None
        self._dropped: set[str] = set()
        self._lock = threading.Lock()

    @property
    def pipeline(self) -> Pipeline:
        return self._pipeline

    @property
    def rows(self) -> int:
        return self._images

    @property
    def max_images(self) -> int:
        return self._images

    def free_rows(self) -> int:
        """All its rows while it holds nothing, else none: one request at a time."""
        return 0 if self.busy else self._images

    @property
    def busy(self) -> bool:
        with self._lock:
            return bool(self._waiting) or self._running is not None

    def compile(self, size: Size, /) -> CompileTimings:
        return self._pipeline.compile(size)

    def admit(
        self, key: str, params: ResolvedParams, on_step: StepCallback, *, image: ImageInput | None = None
    ) -> None:
        """Queue a request; one asking for more images than a generation makes, or with an input image, is refused
        at once."""
        refuse_images(image)
        if params.n > self._images:
            raise PipelineError(f"n={params.n}: this worker makes at most {self._images} images per request")
        with self._lock:
            self._dropped.discard(key)
            self._waiting.append((key, params, on_step))

    def cancel(self, key: str) -> None:
        with self._lock:
            self._dropped.add(key)

    def step(self) -> Tick:
        """Run the first waiting request to its end (one not dropped meanwhile)."""
        tick = Tick()
        head = self._next()
        if head is None:
            return tick
        key, params, on_step = head
        try:
            pixels = self._pipeline.generate(params, on_step=self._guarded(key, on_step))
        except _Dropped:
            pass
        except _Stopped as stop:
            tick.stopped.append((key, stop.cause))
        except PipelineError as exc:
            tick.failed.append((key, str(exc)))
        except Exception as exc:  # the device side of the per-job boundary: the job fails, the engine serves on
            logger.exception("request %s failed on the device", key)
            tick.failed.append((key, f"{type(exc).__name__}: {exc}"))
        else:
            tick.finished.append((key, pixels[: params.n]))
            tick.samples = samples_of(params, len(pixels))
        finally:
            with self._lock:
                self._running = None
        return tick

    def close(self) -> None:
        """Nothing to release: the pipeline holds only arrays."""

    def _next(self) -> tuple[str, ResolvedParams, StepCallback] | None:
        with self._lock:
            while self._waiting:
                head = self._waiting.popleft()
                if head[0] in self._dropped:
                    self._dropped.discard(head[0])
                    continue
                self._running = head[0]
                return head
        return None

    def _guarded(self, key: str, on_step: StepCallback) -> StepCallback:
        """`on_step`, telling what it raises apart from the pipeline's own errors, and stopping a dropped request."""

        def guarded(step: int) -> None:
            with self._lock:
                if key in self._dropped:
                    self._dropped.discard(key)
                    raise _Dropped(key)
            try:
                on_step(step)
            except Exception as exc:
                raise _Stopped(exc) from exc

        return guarded


class ImagesRefused(PipelineError):
    """A request with an input image on an engine that makes images from text only."""


def refuse_images(image: ImageInput | None) -> None:
    """ImagesRefused for a request with an input image: one request at a time runs text-to-image only."""
    if image is not None:
        raise ImagesRefused(
            "image: this worker runs one request at a time (--engine request), which makes images from text only; "
            "image-to-image and inpainting run on the row engine (--engine rows)"
        )


def as_engine(loaded: Pipeline | Engine, images: int) -> Engine:
    """What a loader returned, as an engine: an `Engine` as it is, a `Pipeline` run one request at a time."""
    if _is_engine(loaded):
        return loaded
    return RequestAtATime(loaded, images)


def _is_engine(loaded: Pipeline | Engine) -> TypeIs[Engine]:
    return all(hasattr(loaded, name) for name in ("admit", "step", "free_rows"))


def samples_of(params: ResolvedParams, images: int) -> dict[str, int]:
    """The UNet samples of a request run alone in a batch of `images`: its own `n` rows at every step, and the
    images it did not ask for as padding (each guided image two samples per step, unguided one)."""
    weight, steps = (2 if guided(params.guidance_scale) else 1), params.shape.steps
    own = "guided" if weight == 2 else "unguided"
    asked = min(params.n, images)  # a pipeline may make fewer than n: the request gets what it made
    counts = {own: asked * weight * steps, "padding": (images - asked) * weight * steps}
    return {name: count for name, count in counts.items() if count}
