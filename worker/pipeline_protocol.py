"""What the worker needs of a pipeline: the one definition that the JAX pipeline (worker/pipeline.py), the stand-in
(testkit/standin.py) and the tests' pipelines implement, and that the worker is typed against.

A pipeline describes what it serves, compiles one image size at a time, and generates one request's images,
calling `on_step` as each denoising step is done. Every call runs on the worker's device thread
(worker/device.py), never on the event loop. This module imports no JAX: the worker's typing does not load it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

from common.protocol import ResolvedParams, Size

if TYPE_CHECKING:
    from worker.pipeline import CompileTimings

# Called on the device thread as denoising step n (1-based) is done; it may raise to stop the generation there.
StepCallback = Callable[[int], None]


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
