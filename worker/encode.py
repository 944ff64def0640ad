"""Encoding generated images for delivery, several at once (Pillow releases the GIL while compressing)."""

from __future__ import annotations

import io
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from common.protocol import OutputFormat
from worker.watermark import MIN_WIDTH, watermark_one

MEDIA_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


@dataclass(frozen=True)
class Encoding:
    """How to encode: the format, JPEG/WebP quality (1..100), PNG's zlib level (0..9), and whether the invisible
    watermark goes on first (worker/watermark.py)."""

    format: OutputFormat = "png"
    quality: int = 90
    png_compress_level: int = 1
    watermark: bool = True

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.format]

    def save_options(self) -> dict[str, Any]:
        if self.format == "png":
            return {"format": "PNG", "compress_level": self.png_compress_level}
        if self.format == "jpeg":
            return {"format": "JPEG", "quality": self.quality}
        # libwebp's fastest method (0 of 0..6): on 1024x1024 images it encodes 1.5-2.5x faster than its
        # default (4) at the same size within a few percent (bench/encode.py, docs/benchmarks.md).
        return {"format": "WEBP", "quality": self.quality, "method": 0}


def encode(image: np.ndarray, encoding: Encoding) -> bytes:
    """One uint8 HxWx3 array as image file bytes, watermarked first unless the encoding says not (or the image is
    narrower than the reference marks)."""
    if encoding.watermark and image.shape[1] >= MIN_WIDTH:
        image = watermark_one(image)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, **encoding.save_options())
    return buffer.getvalue()


def encode_all(images: np.ndarray, encoding: Encoding, executor: Executor) -> list[bytes]:
    """Encode a batch of images in parallel, keeping their order."""
    return list(executor.map(lambda image: encode(image, encoding), images))
