"""The invisible watermark on the devices: worker/watermark.py's arithmetic as one jitted function over a whole
batch, run by the worker right after the pipeline (and the safety checker), before the images are encoded.

worker/watermark.py stays the reference, in numpy; this is the same float32 arithmetic in the same order, so the
marked pixels are the same to the bit (tests/test_watermark.py). The batch is split by rows over the local
devices where the height allows (every device then marks whole 8x8 pixel blocks: a 2x2 Haar step, then 4x4
blocks of the low band), and runs on the first device where it does not. One executable per served size,
compiled at warm-up.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from common.protocol import Size
from worker.watermark import (
    B_FROM_U,
    BLOCK,
    DELTA,
    G_FROM_U,
    G_FROM_V,
    MIN_WIDTH,
    R_FROM_V,
    SCALE,
    U_FROM_B,
    V_FROM_R,
    WATERMARK_BITS,
    Y_FROM_RGB,
)

_ROWS = "rows"
_SPLIT_ROWS = PartitionSpec(None, _ROWS)  # type: ignore[no-untyped-call]
_PIXEL_BLOCK = 2 * BLOCK  # a low-band block covers 8x8 pixels


class DeviceWatermark:
    """Marks uint8 N x H x W x 3 batches on the local devices; `compile` once per served size and batch."""

    def __init__(self, devices: list[Any] | None = None) -> None:
        self._devices = devices if devices is not None else jax.local_devices()
        self._mesh = Mesh(np.array(self._devices), (_ROWS,))
        self._mark = jax.jit(mark_batch)

    def sharding(self, height: int) -> jax.sharding.Sharding:
        """Rows split over the devices when each device gets whole 8x8 blocks; else the first device alone."""
        if height % (_PIXEL_BLOCK * len(self._devices)) == 0:
            return NamedSharding(self._mesh, _SPLIT_ROWS)
        return SingleDeviceSharding(self._devices[0])

    def compile(self, size: Size, batch: int) -> None:
        """Compile and run the mark once for batches of `batch` images of `size`."""
        self.apply(np.zeros((batch, size.height, size.width, 3), dtype=np.uint8))

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """The batch, marked; narrower than 256 pixels, returned as it is (the reference leaves it)."""
        if pixels.shape[2] < MIN_WIDTH:
            return pixels
        placed = jax.device_put(pixels, self.sharding(pixels.shape[1]))
        marked: np.ndarray = np.asarray(jax.device_get(self._mark(placed, np.int32(0))))
        return marked


def mark_batch(pixels: jax.Array, zero: jax.Array) -> jax.Array:
    """worker/watermark.py's `watermark_one` over a uint8 N x H x W x 3 batch, in the same float32 steps;
    `zero` is an int32 0 passed at run time (see `_products`)."""
    rgb = pixels.astype(jnp.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    # Every product is held apart from the sum it feeds: XLA would otherwise fuse the two into one fused
    # multiply-add, rounded once where numpy rounds twice, and a pixel here and there would land one level off.
    ry, gy, by = _products(zero, r * Y_FROM_RGB[0], g * Y_FROM_RGB[1], b * Y_FROM_RGB[2])
    y = ry + gy + by
    bu, dv = _products(zero, (b - y) * U_FROM_B, (r - y) * V_FROM_R)
    u = bu + DELTA
    rows, cols = (pixels.shape[1] // 4) * 4, (pixels.shape[2] // 4) * 4
    u = u.at[:, :rows, :cols].set(_mark_channel(u[:, :rows, :cols])) - DELTA
    rv, gu, gv, bu = _products(zero, R_FROM_V * dv, G_FROM_U * u, G_FROM_V * dv, B_FROM_U * u)
    out = jnp.stack([y + rv, y + gu + gv, y + bu], axis=-1)
    return jnp.clip(jnp.rint(out), 0, 255).astype(jnp.uint8)


def _products(zero: jax.Array, *products: jax.Array) -> tuple[jax.Array, ...]:
    """The products, each rounded to float32 before anything adds them: their bits OR a zero that is only known
    at run time, which no compiler pass can see through (XLA drops an `optimization_barrier` before LLVM fuses
    a multiply and an add)."""
    return tuple(
        jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(product, jnp.int32) | zero, jnp.float32)
        for product in products
    )


def _mark_channel(channel: jax.Array) -> jax.Array:
    """The Haar DWT, the mark on the low band, and the inverse (detail bands swapped, as the reference's)."""
    n, height, width = channel.shape
    quads = channel.reshape(n, height // 2, 2, width // 2, 2)
    a, b, c, d = quads[:, :, 0, :, 0], quads[:, :, 0, :, 1], quads[:, :, 1, :, 0], quads[:, :, 1, :, 1]
    low = _mark_low_band((a + b + c + d) / 2)
    horizontal, vertical, diagonal = (a - b + c - d) / 2, (a + b - c - d) / 2, (a - b - c + d) / 2
    top = jnp.stack([(low + horizontal + vertical + diagonal) / 2, (low + horizontal - vertical - diagonal) / 2], -1)
    bottom = jnp.stack([(low - horizontal + vertical - diagonal) / 2, (low - horizontal - vertical + diagonal) / 2], -1)
    return jnp.stack([top, bottom], axis=2).reshape(n, height, width)


def _mark_low_band(low: jax.Array) -> jax.Array:
    """In every 4x4 block, the coefficient of largest magnitude but the first quantised to carry its bit; the
    bits run over the blocks in row-major order, per image, as the reference's."""
    n = low.shape[0]
    rows, cols = low.shape[1] // BLOCK, low.shape[2] // BLOCK
    region = low[:, : rows * BLOCK, : cols * BLOCK]
    flat = region.reshape(n, rows, BLOCK, cols, BLOCK).transpose(0, 1, 3, 2, 4).reshape(n, rows, cols, BLOCK**2)
    where = jnp.argmax(jnp.abs(flat[..., 1:]), axis=-1) + 1
    index = (jnp.arange(rows)[:, None] * cols + jnp.arange(cols)[None, :]) % WATERMARK_BITS.size
    bits = jnp.asarray(WATERMARK_BITS)[index]
    value = jnp.take_along_axis(flat, where[..., None], axis=-1)[..., 0]
    quantised = (jnp.abs(value) // SCALE + 0.25 + 0.5 * bits) * SCALE
    chosen = jnp.arange(BLOCK**2) == where[..., None]
    flat = jnp.where(chosen, jnp.where(value >= 0, quantised, -quantised)[..., None], flat)
    blocks = flat.reshape(n, rows, cols, BLOCK, BLOCK).transpose(0, 1, 3, 2, 4)
    return low.at[:, : rows * BLOCK, : cols * BLOCK].set(blocks.reshape(n, rows * BLOCK, cols * BLOCK))
