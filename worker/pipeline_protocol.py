"""What the worker needs of a model: the definitions that the JAX pipeline (worker/pipeline.py), its engine
(worker/engine.py), the stand-in (testkit/standin.py) and the tests' pipelines implement, and that the worker is
typed against.

A `Pipeline` describes what it serves, compiles one image size at a time, and generates one request's images,
calling `on_step` as each denoising step is done. An `Engine` is what the worker schedules: it holds the rows
(images) of several requests at once in its batch, and between two denoising steps finished rows leave and waiting
rows join. `RequestAtATime` (worker/sequential.py) makes an engine of any `Pipeline` that runs one request at a time,
as a worker did before the engine. Every call runs on the worker's device thread (worker/device.py), never on the
event loop, except `Engine.cancel`. This module imports no JAX: the worker's typing does not load it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from common.protocol import RequestKind, ResolvedParams, Size

if TYPE_CHECKING:
    from worker.pipeline import CompileTimings

# The classes of UNet samples an engine reports (`Tick.samples`).
SAMPLE_CLASSES = ("guided", "unguided", "padding")
# Called on the device thread as denoising step n (1-based) is done; it may raise to stop the generation there.
StepCallback = Callable[[int], None]


@dataclass(frozen=True, eq=False)
class ImageInput:
    """A request's input image, for image-to-image or (with `mask`) inpainting: `image` uint8 [H, W, 3] at any size
    (the engine resizes it to the request's), `mask` bool [H, W] of the image's size (True: repaint) or None, and
    the request's `strength` (0..1: how much of the schedule runs, worker/img2img.py). Compared by identity: its
    arrays have no single truth value."""

    image: np.ndarray
    mask: np.ndarray | None
    strength: float


class Pipeline(Protocol):
    """A loaded model that generates images on this host's devices."""

    @property
    def device_kind(self) -> str:
        """The accelerator's name (`cpu`, `TPU v5 lite`, ...), as the registry and the metrics show it."""
        ...

    @property
    def devices(self) -> int:
        """How many local devices a generation is spread over."""
        ...

    @property
    def max_steps(self) -> int:
        """The most denoising steps a request may ask for; every count from 1 up to it is served."""
        ...

    @property
    def schedulers(self) -> Sequence[str]:
        """The schedulers a request may name."""
        ...

    @property
    def request_kinds(self) -> Sequence[RequestKind]:
        """The kinds of request the model runs: SDXL base all three, an inpainting model (a 9-channel UNet)
        inpainting only. The worker advertises those of them its engine runs too (worker/presence.py)."""
        ...

    def default_sizes(self) -> Sequence[Size]:
        """The sizes to compile when the operator names none (the model's native size first)."""
        ...

    def compile(self, size: Size, /) -> CompileTimings:
        """Compile and warm up everything `size` needs, so that no request waits for a compile."""
        ...

    def generate(self, params: ResolvedParams, on_step: StepCallback | None = None) -> np.ndarray:
        """One request's images, uint8 [images, height, width, 3]. Raises worker.pipeline.PipelineError (or a
        subclass) for a request it cannot serve; whatever `on_step` raises ends the generation."""
        ...


@dataclass
class Tick:
    """What an engine's `step` ended: the requests whose images are done (`finished`: uint8 [n, height, width, 3],
    their watermark and safety check still to come), the requests whose `on_step` raised (`stopped`: the exception,
    e.g. worker.progress.Cancelled; their rows left the batch), and those that failed on the device (`failed`: the
    reason). `samples`: the UNet samples the step ran, by class (SAMPLE_CLASSES): for guided rows (two per row
    and step), unguided rows (one), and padding (run for no row: a bucket's empty places, a batch's unasked
    images)."""

    finished: list[tuple[str, np.ndarray]] = field(default_factory=list)
    stopped: list[tuple[str, BaseException]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    samples: dict[str, int] = field(default_factory=dict)


class Engine(Protocol):
    """The batch of one worker: rows of several requests denoised together, joining and leaving at step boundaries.

    A request is admitted under a key (the job's id) with its `on_step`, and waits until its `n` rows fit; waiting
    requests start in arrival order. Each `step` runs one denoising step of the rows of one image size (the engine
    alternates between the sizes it holds), calls `on_step(n)` of each request that reached step n, and returns
    what ended. A request's image i with seed s is the same whichever rows share its batch.
    """

    @property
    def pipeline(self) -> Pipeline:
        """The model it runs."""
        ...

    @property
    def rows(self) -> int:
        """The most rows (images) it holds at once, over all its devices."""
        ...

    @property
    def max_images(self) -> int:
        """The most images one request may ask for (advertised as `images_per_request`)."""
        ...

    def free_rows(self) -> int:
        """Rows that no admitted request (running or waiting) holds: what the worker may claim for."""
        ...

    @property
    def busy(self) -> bool:
        """Whether it holds any request (running or waiting): then `step` has work."""
        ...

    def compile(self, size: Size, /) -> CompileTimings:
        """Compile and warm up everything `size` needs at every batch shape, so that no request waits for a
        compile."""
        ...

    def admit(
        self, key: str, params: ResolvedParams, on_step: StepCallback, *, image: ImageInput | None = None
    ) -> None:
        """Take a request (with `image`, an image-to-image or inpainting one); its rows join the batch at a step
        boundary, once they fit. Raises worker.pipeline.PipelineError (or a subclass) at once for one it cannot
        serve (then nothing is held)."""
        ...

    def cancel(self, key: str) -> None:
        """Drop a request, waiting or running, without a result (thread-safe: any thread may call it); its rows
        leave at the next step boundary."""
        ...

    def step(self) -> Tick:
        """Run one denoising step of one size's rows (after admitting the waiting rows that fit), and return what
        ended."""
        ...

    def close(self) -> None:
        """Release what it holds besides the devices (the row engine: the thread that reads adapters). The worker
        calls it once, as it stops; nothing is admitted or stepped after."""
        ...
