"""The invisible watermark (worker/watermark.py): the reference pipeline's pixels, read back by the
`invisible-watermark` package's own decoder from the PNG and WebP a real worker delivers, and `--watermark off`."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from PIL import Image

from common.protocol import ResolvedParams, Shape
from sdxl_serve.cli import build_parser
from testkit.standin import StandInPipeline
from tests.protection import gateway, running_worker
from tests.support import ClientFactory, RedisServer
from tests.watermarks import payload_bits_read, reference_mark
from worker.cli import worker_config
from worker.device_watermark import DeviceWatermark
from worker.encode import Encoding, encode
from worker.watermark import apply_watermark, watermark_one

MARKED = 44  # of 48 bits read back: the payload is there (an unmarked image reads about half, by chance)
UNMARKED = 32
SHAPE = Shape(width=256, height=256, steps=2)


def smooth(height: int = 256, width: int = 256) -> np.ndarray:
    """Gradients in each channel: the broad areas of colour most generated images are made of."""
    y, x = np.linspace(0, 1, height)[:, None], np.linspace(0, 1, width)[None, :]
    return (np.stack([y * x, (1 - y) * x, y * (1 - x)], axis=-1) * 255).astype(np.uint8)


def noisy() -> np.ndarray:
    noise = np.random.default_rng(0).normal(0, 20, (256, 256, 3))
    return np.clip(smooth() + noise, 0, 255).astype(np.uint8)


def flat() -> np.ndarray:
    return np.full((256, 256, 3), 128, dtype=np.uint8)


IMAGES: dict[str, Callable[[], np.ndarray]] = {"flat": flat, "smooth": smooth, "noisy": noisy}


@pytest.mark.parametrize("make", [flat, smooth, noisy, lambda: smooth(264, 328)])
def test_the_mark_is_the_reference_pipelines_to_one_level(make: Callable[[], np.ndarray]) -> None:
    image = make()
    ours, theirs = watermark_one(image), reference_mark(image)
    difference = np.abs(ours.astype(int) - theirs.astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3  # float rounding, a pixel in thousands
    assert (ours != image).any()


def uniform(height: int = 256, width: int = 256) -> np.ndarray:
    """Every value 0..255 in every channel: the most pixels at rounding boundaries."""
    return np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("height,width", [(256, 256), (264, 328), (512, 512)])
def test_the_devices_mark_is_the_numpy_references_to_the_bit(height: int, width: int) -> None:
    """Split by rows over the four devices (256, 512) or on one (264 is not a multiple of 4 x 8 rows)."""
    batch = np.stack([smooth(height, width), uniform(height, width), noisy_at(height, width)])
    marked = DeviceWatermark().apply(batch)
    assert marked.dtype == np.uint8
    for image, ours in zip(batch, marked, strict=True):
        assert (ours == watermark_one(image)).all()


def test_the_devices_split_rows_only_in_whole_blocks() -> None:
    watermark = DeviceWatermark()
    assert len(watermark.sharding(1024).device_set) == 4
    assert len(watermark.sharding(264).device_set) == 1


def test_the_devices_leave_narrow_images_alone() -> None:
    small = np.stack([smooth(256, 128)] * 2)
    assert DeviceWatermark().apply(small) is small


def test_the_package_reads_the_devices_mark_from_the_png() -> None:
    marked = DeviceWatermark().apply(np.stack([smooth(), noisy()]))
    for image in marked:
        assert payload_bits_read(encode(image, Encoding("png", watermark=False))) >= MARKED


def noisy_at(height: int, width: int) -> np.ndarray:
    noise = np.random.default_rng(0).normal(0, 20, (height, width, 3))
    return np.clip(smooth(height, width) + noise, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", IMAGES)
def test_png_keeps_the_payload_whatever_the_content(name: str) -> None:
    image = IMAGES[name]()
    assert payload_bits_read(encode(image, Encoding("png"))) >= MARKED
    assert payload_bits_read(encode(image, Encoding("png", watermark=False))) <= UNMARKED


def test_lossy_webp_keeps_it_on_smooth_content_but_not_on_noise() -> None:
    assert payload_bits_read(encode(smooth(), Encoding("webp", 90))) >= MARKED
    assert payload_bits_read(encode(noisy(), Encoding("webp", 90))) <= UNMARKED


def test_images_narrower_than_the_reference_marks_are_left_alone() -> None:
    small = np.stack([smooth(256, 128)] * 2)
    assert apply_watermark(small) is small
    assert encode(small[0], Encoding("png")) == encode(small[0], Encoding("png", watermark=False))


def test_the_flag_turns_it_off_and_it_is_on_by_default() -> None:
    parse = build_parser().parse_args
    assert worker_config(parse(["worker"])).watermark
    assert not worker_config(parse(["worker", "--watermark", "off"])).watermark


class Gradients(StandInPipeline):
    """A stand-in pipeline whose images are smooth gradients, as a generated image mostly is."""

    def generate(self, params: ResolvedParams, on_step: Callable[[int], None] | None = None) -> np.ndarray:
        super().generate(params, on_step)
        return np.stack([smooth(params.height, params.width)] * 2)


async def delivered(client: Any, output_format: str) -> list[bytes]:
    body = {"prompt": "a lighthouse", "width": 256, "height": 256, "output_format": output_format}
    response = await client.post("/v1/generate", json=body)
    assert response.status == 200, await response.text()
    return [base64.b64decode(image) for image in (await response.json())["images"]]


@pytest.mark.parametrize("watermark", [True, False])
async def test_a_real_worker_delivers_marked_png_and_webp_unless_turned_off(
    aiohttp_client: ClientFactory, redis_server: RedisServer, watermark: bool
) -> None:
    pipeline = Gradients((SHAPE,), images=2)
    async with running_worker(redis_server.url(0), shapes=(SHAPE,), pipeline=pipeline, watermark=watermark):
        client = await gateway(aiohttp_client, redis_server, request_timeout_s=30.0)
        for output_format in ("png", "webp"):
            for image in await delivered(client, output_format):
                read = payload_bits_read(image)
                assert read >= MARKED if watermark else read <= UNMARKED, (output_format, read)
        png = (await delivered(client, "png"))[0]
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    # Marked once (on the devices), to the bit as the numpy reference marks; off, the pipeline's pixels untouched.
    assert (pixels == (watermark_one(smooth()) if watermark else smooth())).all()
