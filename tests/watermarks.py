"""The `invisible-watermark` package's own DWT-DCT embedder and decoder, for the watermark tests.

The package's `__init__` imports torch for its RivaGAN method, which nothing here uses and the test environment
does not install; its DWT-DCT class (`imwatermark/maxDct.py`, which the package's `WatermarkEncoder` and
`WatermarkDecoder` call for `dwtDct`) is loaded from the installed package's file on its own.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from worker.watermark import WATERMARK_BITS

PAYLOAD = [int(bit) for bit in WATERMARK_BITS]


@cache
def _max_dct() -> Any:
    path = Path(str(importlib.metadata.distribution("invisible-watermark").locate_file("imwatermark/maxDct.py")))
    spec = importlib.util.spec_from_file_location("imwatermark_maxdct", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EmbedMaxDct


def reference_mark(rgb: np.ndarray) -> np.ndarray:
    """What diffusers' `StableDiffusionXLWatermarker` makes of a uint8 RGB image: the package's encoder on its
    0..255 float BGR pixels, rounded back to uint8 RGB."""
    bgr = np.ascontiguousarray(rgb[..., ::-1]).astype(np.float32)
    marked: np.ndarray = _max_dct()(PAYLOAD, wmLen=len(PAYLOAD)).encode(bgr)[..., ::-1]
    rounded: np.ndarray = np.clip(np.rint(marked), 0, 255).astype(np.uint8)
    return rounded


def payload_bits_read(image_file: bytes) -> int:
    """How many of the 48 payload bits the package's decoder reads back from an image file. The pixels go to it
    as floats, the domain the reference marks in (fed uint8, OpenCV moves the U channel's offset from 0.5 to
    128 and the decoder looks at other coefficients than the embedder chose)."""
    rgb = np.asarray(Image.open(io.BytesIO(image_file)).convert("RGB"))
    bgr = np.ascontiguousarray(rgb[..., ::-1]).astype(np.float32)
    bits = _max_dct()([], wmLen=len(PAYLOAD)).decode(bgr)
    return sum(int(read) == sent for read, sent in zip(bits, PAYLOAD, strict=True))
