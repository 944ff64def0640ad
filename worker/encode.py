"""Encoding generated images for delivery, several at once (Pillow releases the GIL while compressing)."""

from __future__ import annotations

import io
from concurrent.futures import Executor

import numpy as np
from PIL import Image

MEDIA_TYPES = {"png": "image/png"}


def encode_png(image: np.ndarray, compress_level: int) -> bytes:
    """One uint8 HxWx3 array as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def encode_all(images: np.ndarray, compress_level: int, executor: Executor) -> list[bytes]:
    """Encode a batch of images in parallel, keeping their order."""
    return list(executor.map(lambda image: encode_png(image, compress_level), images))
