"""Safetensors files read one tensor at a time into numpy, with no torch and no pickle.

A checkpoint is opened (its header read and checked against the file's length, so a truncated download
fails here) and described by `TensorRef`s: a name, a shape and the slicing or transposing to apply once
read. Name conversions work on the references; each tensor is read only when its converted value is
wanted, so converting a 7 GB checkpoint never holds more than the converted parameters and one tensor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors import SafetensorError, safe_open

logger = logging.getLogger(__name__)

Transform = Callable[[np.ndarray], np.ndarray]


class UnreadableFile(Exception):
    """A weights file that is not a complete safetensors file."""


class SafetensorsFile:
    """An open safetensors file; `refs()` describes its tensors without reading them."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._stack = ExitStack()
        try:
            self._numpy = self._stack.enter_context(safe_open(str(path), framework="np"))
        except SafetensorError as exc:
            raise UnreadableFile(f"{path}: not a complete safetensors file ({exc}); a truncated download?") from exc
        self._flax: Any = None

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def refs(self) -> dict[str, TensorRef]:
        """Every tensor of the file, unread."""
        return {name: TensorRef(self, name, tuple(self._numpy.get_slice(name).get_shape())) for name in self.keys()}

    def keys(self) -> list[str]:
        return list(self._numpy.keys())

    def dtype(self, name: str) -> str:
        """The stored dtype in safetensors' spelling (F32, F16, BF16...)."""
        return str(self._numpy.get_slice(name).get_dtype())

    def read(self, name: str) -> np.ndarray:
        """One tensor as a numpy array in its stored dtype (bfloat16 as ml_dtypes' bfloat16)."""
        if self.dtype(name) != "BF16":
            return np.asarray(self._numpy.get_tensor(name))
        # safetensors' numpy reader has no bfloat16; its Flax reader does. On the host CPU device, so an
        # accelerator's memory is never touched by loading.
        if self._flax is None:
            self._flax = self._stack.enter_context(safe_open(str(self.path), framework="flax"))
        with jax.default_device(jax.devices("cpu")[0]):
            return np.asarray(self._flax.get_tensor(name))


@dataclass(frozen=True)
class TensorRef:
    """A tensor of a `SafetensorsFile`, with the transforms (slices, transposes) to apply once read.

    It has the part of the numpy interface that key-conversion code uses (`shape`, `ndim`, `[...]`, `.T`),
    so diffusers' own conversion functions can run over references instead of loaded arrays.
    """

    file: SafetensorsFile = field(repr=False, compare=False)
    name: str
    shape: tuple[int, ...]
    transforms: tuple[Transform, ...] = field(default=(), repr=False, compare=False)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def T(self) -> TensorRef:
        return self._then(lambda a: a.T)

    def __getitem__(self, index: Any) -> TensorRef:
        return self._then(lambda a: a[index])

    def read(self) -> np.ndarray:
        array = self.file.read(self.name)
        for transform in self.transforms:
            array = transform(array)
        return np.ascontiguousarray(array)

    def _then(self, transform: Transform) -> TensorRef:
        # The new shape, from an array of the old shape that takes no memory (every stride zero).
        shape = transform(np.broadcast_to(np.zeros((), np.int8), self.shape)).shape
        return replace(self, shape=tuple(shape), transforms=(*self.transforms, transform))


def open_all(paths: list[Path], stack: ExitStack) -> Iterator[SafetensorsFile]:
    """Open each file, closed with `stack`."""
    for path in paths:
        yield stack.enter_context(SafetensorsFile(path))
