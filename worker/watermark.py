"""The invisible watermark SDXL's reference pipeline puts on every image, applied before encoding.

The method and payload are those of diffusers' `StableDiffusionXLWatermarker`: `invisible-watermark`'s
`dwtDct` method (a Haar DWT of the image's U channel, then in each 4x4 block of the low band the coefficient of
largest magnitude but the first is quantised to a step of 36, landing at a quarter of the step for a 0 bit and
three quarters for a 1) with Stability AI's 48-bit message, repeated over the blocks. This module does the same
arithmetic in numpy, vectorised over the blocks, so a worker needs neither OpenCV, PyWavelets nor torch; the
tests decode its output with the package's own decoder. Images narrower than 256 pixels are left alone, as the
reference leaves them.
"""

from __future__ import annotations

import numpy as np

# Stability AI's message (generative-models' streamlit_helpers.py), as diffusers' watermark.py carries it.
WATERMARK_MESSAGE = 0b101100111110110010010000011110111011000110011110
WATERMARK_BITS = np.array([int(bit) for bit in bin(WATERMARK_MESSAGE)[2:]], dtype=np.float32)
MIN_WIDTH = 256  # the reference skips narrower images
SCALE = 36.0  # the quantisation step of the U channel (invisible-watermark's default scales [0, 36, 36])
BLOCK = 4

# OpenCV's float BGR<->YUV conversion (its delta for float images is 0.5), which invisible-watermark uses.
Y_FROM_RGB = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # R, G, B
U_FROM_B, V_FROM_R = 0.492, 0.877
B_FROM_U, G_FROM_U, G_FROM_V, R_FROM_V = 2.032, -0.395, -0.581, 1.140
DELTA = 0.5


def apply_watermark(images: np.ndarray) -> np.ndarray:
    """Mark a batch of uint8 N x H x W x 3 RGB images; narrower than 256 pixels, they are returned as they are."""
    if images.shape[2] < MIN_WIDTH:
        return images
    return np.stack([watermark_one(image) for image in images])


def watermark_one(image: np.ndarray) -> np.ndarray:
    """One uint8 H x W x 3 RGB image, marked. The arithmetic runs in float32 as the reference's does, on the
    image's pixels as 0..255 floats, and the result is rounded back to uint8."""
    rgb = image.astype(np.float32)
    # Summed in this order, not as a matmul (whose order is BLAS's), so that the devices' version
    # (worker/device_watermark.py) can match it to the bit.
    y = rgb[..., 0] * Y_FROM_RGB[0] + rgb[..., 1] * Y_FROM_RGB[1] + rgb[..., 2] * Y_FROM_RGB[2]
    u = (rgb[..., 2] - y) * U_FROM_B + DELTA
    rows, cols = (image.shape[0] // 4) * 4, (image.shape[1] // 4) * 4
    u[:rows, :cols] = _mark_channel(u[:rows, :cols])
    u -= DELTA
    # V is untouched: its difference from Y is R's, scaled; the float buffer is reused for the result.
    dv = (rgb[..., 0] - y) * V_FROM_R
    rgb[..., 0] = y + R_FROM_V * dv
    rgb[..., 1] = y + G_FROM_U * u + G_FROM_V * dv
    rgb[..., 2] = y + B_FROM_U * u
    np.rint(rgb, out=rgb)
    np.clip(rgb, 0, 255, out=rgb)
    return rgb.astype(np.uint8)


def _mark_channel(channel: np.ndarray) -> np.ndarray:
    """A one-level Haar DWT (PyWavelets' `haar` convention), the mark on its low band, and the inverse."""
    a, b = channel[0::2, 0::2], channel[0::2, 1::2]
    c, d = channel[1::2, 0::2], channel[1::2, 1::2]
    low = _mark_low_band((a + b + c + d) / 2)
    horizontal, vertical, diagonal = (a + b - c - d) / 2, (a - b + c - d) / 2, (a - b - c + d) / 2
    # The reference hands the detail bands back with horizontal and vertical swapped; kept, so that the
    # pixels are the reference's (the low band, which carries the mark, is the same either way).
    horizontal, vertical = vertical, horizontal
    out = np.empty_like(channel)
    out[0::2, 0::2] = (low + horizontal + vertical + diagonal) / 2
    out[0::2, 1::2] = (low + horizontal - vertical - diagonal) / 2
    out[1::2, 0::2] = (low - horizontal + vertical - diagonal) / 2
    out[1::2, 1::2] = (low - horizontal - vertical + diagonal) / 2
    return out


def _mark_low_band(low: np.ndarray) -> np.ndarray:
    """Quantise, in every 4x4 block, the coefficient of largest magnitude but the first to carry its bit."""
    rows, cols = low.shape[0] // BLOCK, low.shape[1] // BLOCK
    blocks = low[: rows * BLOCK, : cols * BLOCK].reshape(rows, BLOCK, cols, BLOCK).transpose(0, 2, 1, 3)
    flat = blocks.reshape(rows * cols, BLOCK * BLOCK)
    where = np.argmax(np.abs(flat[:, 1:]), axis=1) + 1
    bits = WATERMARK_BITS[np.arange(rows * cols) % WATERMARK_BITS.size]
    value = flat[np.arange(flat.shape[0]), where]
    quantised = (np.abs(value) // SCALE + 0.25 + 0.5 * bits) * SCALE
    flat[np.arange(flat.shape[0]), where] = np.where(value >= 0, quantised, -quantised)
    low[: rows * BLOCK, : cols * BLOCK] = (
        flat.reshape(rows, cols, BLOCK, BLOCK).transpose(0, 2, 1, 3).reshape(rows * BLOCK, cols * BLOCK)
    )
    return low
