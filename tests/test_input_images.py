"""Input images from hostile bytes: every bad file is one `InputImageError` naming the field and the rule; good
files become oriented 8-bit RGB; masks are thresholded and checked against their image."""

from __future__ import annotations

import io
import random
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image, ImageCms

from common.input_images import (
    PILLOW_MAX_IMAGE_PIXELS,
    InputImageError,
    InputLimits,
    decode_image,
    decode_mask,
    resize_mask_to,
    resize_to,
    sniff,
    to_model_input,
)
from tests.deployfiles import ROOT

# As in a server (common.input_images installs this filter at import; pytest resets filters around each test).
pytestmark = pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")

LIMITS = InputLimits()
FIELD = "image"


def encoded(image: Image.Image, fmt: str, **params: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def gradient(width: int = 48, height: int = 32) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_declaring(width: int, height: int, *extra: bytes) -> bytes:
    """A PNG whose header declares `width` x `height` RGB pixels, with `extra` chunks and a tiny pixel stream."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    pixels = png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + header + b"".join(extra) + pixels + png_chunk(b"IEND", b"")


def jpeg_declaring(width: int, height: int) -> bytes:
    """A valid small JPEG whose frame header (SOF0) is changed to declare `width` x `height`."""
    data = bytearray(VALID["jpeg"])
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def webp_declaring(width: int, height: int) -> bytes:
    """A valid small extended WebP whose canvas (VP8X) is changed to declare `width` x `height`."""
    exif = Image.Exif()
    exif[0x0112] = 1  # EXIF makes Pillow write the extended format, with its VP8X canvas size
    data = bytearray(encoded(gradient(), "WEBP", exif=exif.tobytes()))
    vp8x = data.index(b"VP8X")
    data[vp8x + 12 : vp8x + 18] = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return bytes(data)


def cmyk_jpeg() -> bytes:
    return encoded(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)


def refusal(data: bytes, limits: InputLimits = LIMITS) -> InputImageError:
    with pytest.raises(InputImageError) as caught:
        decode_image(data, FIELD, limits)
    assert caught.value.field == FIELD and str(caught.value).startswith(f"{FIELD}: ")
    return caught.value


VALID: dict[str, bytes] = {
    "png": encoded(gradient(), "PNG"),
    "jpeg": encoded(gradient(), "JPEG", quality=90),
    "webp": encoded(gradient(), "WEBP", quality=90),
    "webp_lossless": encoded(gradient(), "WEBP", lossless=True),
}

# Each hostile file and the rule it fails: one rule, or those a Pillow version may answer first (Pillow refuses some
# zero-sized headers itself).
HOSTILE: dict[str, tuple[Callable[[], bytes], str | frozenset[str]]] = {
    "empty": (lambda: b"", "bytes"),
    "gif": (lambda: encoded(gradient(), "GIF"), "format"),
    "bmp": (lambda: encoded(gradient(), "BMP"), "format"),
    "tiff": (lambda: encoded(gradient(), "TIFF"), "format"),
    "svg": (lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "format"),
    "svg_xml": (lambda: b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', "format"),
    "heic": (lambda: b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\0" * 64, "format"),
    "text": (lambda: b"hello, not an image", "format"),
    "png_truncated": (lambda: VALID["png"][: len(VALID["png"]) // 2], "corrupt"),
    "jpeg_truncated": (lambda: VALID["jpeg"][: len(VALID["jpeg"]) // 2], "corrupt"),
    "webp_truncated": (lambda: VALID["webp"][: len(VALID["webp"]) // 2], "corrupt"),
    "png_signature_only": (lambda: b"\x89PNG\r\n\x1a\n", "corrupt"),
    "png_garbage": (lambda: b"\x89PNG\r\n\x1a\n" + random.Random(1).randbytes(500), "corrupt"),
    "jpeg_garbage": (lambda: b"\xff\xd8\xff" + random.Random(2).randbytes(500), "corrupt"),
    "png_bad_idat": (lambda: png_declaring(16, 16)[:-40] + b"\x00" * 28 + png_chunk(b"IEND", b""), "corrupt"),
    # Polyglots: the leading bytes name one format, the rest is another's.
    "png_magic_jpeg_body": (lambda: b"\x89PNG\r\n\x1a\n" + VALID["jpeg"], "corrupt"),
    "webp_magic_png_body": (lambda: b"RIFF\x00\x10\x00\x00WEBP" + VALID["png"], "corrupt"),
    "gif_with_png_appended": (lambda: encoded(gradient(), "GIF") + VALID["png"], "format"),
    "html_with_png_inside": (lambda: b"<html><body>" + VALID["png"] + b"</body></html>", "format"),
    "zero_width": (lambda: png_declaring(0, 16), frozenset({"pixels", "corrupt"})),
    "zero_height": (lambda: png_declaring(16, 0), frozenset({"pixels", "corrupt"})),
    "bomb_100000x100000": (lambda: png_declaring(100_000, 100_000), "pixels"),
    "bomb_over_pillow_warning": (lambda: png_declaring(9000, 9000), "pixels"),
    "over_side_limit": (lambda: png_declaring(5000, 16), "pixels"),
    "jpeg_bomb_60000x60000": (lambda: jpeg_declaring(60_000, 60_000), "pixels"),
    "jpeg_over_limits": (lambda: jpeg_declaring(5000, 5000), "pixels"),
    "webp_bomb_16000x16000": (lambda: webp_declaring(16_000, 16_000), "pixels"),
    "huge_iccp": (
        lambda: png_declaring(16, 16, png_chunk(b"iCCP", b"icc\0\0" + zlib.compress(b"\0" * 4_000_000))),
        "corrupt",
    ),
    "huge_ztxt": (
        lambda: png_declaring(16, 16, png_chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"a" * 4_000_000))),
        "corrupt",
    ),
    "apng": (
        lambda: encoded(gradient(), "PNG", save_all=True, append_images=[gradient().rotate(90)]),
        "animated",
    ),
    "animated_webp": (
        lambda: encoded(
            gradient(), "WEBP", save_all=True, append_images=[gradient().transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
        ),
        "animated",
    ),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_file_is_refused_with_its_rule(name: str) -> None:
    make, rule = HOSTILE[name]
    error = refusal(make())
    assert error.rule in ({rule} if isinstance(rule, str) else rule), error


def test_an_image_over_the_byte_limit_is_refused_before_it_is_parsed() -> None:
    # Garbage that would be "corrupt" if it were parsed: the size rule answers first.
    error = refusal(b"\x89PNG\r\n\x1a\n" + b"\0" * 1000, InputLimits(max_bytes=100))
    assert error.rule == "bytes"


def test_the_pixel_limits_are_checked_from_the_header_before_any_pixel_is_decoded() -> None:
    # The pixel stream of this file is far too short for its header: decoding it would fail as "corrupt". The
    # limit answers "pixels", so it was checked before decoding; with room for it, decoding fails as it must.
    data = png_declaring(3000, 3000)
    assert refusal(data, InputLimits(max_pixels=1000 * 1000)).rule == "pixels"
    assert refusal(data, InputLimits(max_side=3000, max_pixels=3000 * 3000)).rule == "corrupt"


def test_pillow_opens_lazily_so_the_size_check_costs_only_the_header() -> None:
    # Image.open reads the header: the 108 MB of pixels a 6000x6000 PNG declares exist only after load(). Beyond
    # Pillow's ceiling, open itself refuses, before any pixel.
    image = Image.open(io.BytesIO(png_declaring(6000, 6000)), formats=["PNG"])
    assert image.size == (6000, 6000) and image.tile  # the pixel data is still to be decoded
    assert Image.MAX_IMAGE_PIXELS == PILLOW_MAX_IMAGE_PIXELS
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(png_declaring(100_000, 100_000)), formats=["PNG"])


def test_pillows_bomb_warning_is_our_error_not_a_log_line() -> None:
    # In a fresh interpreter, as a server runs (pytest installs its own warning filters around each test).
    script = (
        "from common.input_images import decode_image, InputLimits, InputImageError\n"
        "from tests.test_input_images import png_declaring\n"
        "try:\n    decode_image(png_declaring(9000, 9000), 'image', InputLimits())\n"
        "except InputImageError as error:\n    print(error.rule, error.message)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0 and "DecompressionBombWarning" not in result.stderr, result.stderr
    assert result.stdout.startswith("pixels the image declares too many pixels (Image size (81000000 pixels)")


def test_the_declaring_helpers_change_only_the_size() -> None:
    # Else the bombs above would be refused for another reason than their size.
    assert decode_image(jpeg_declaring(48, 32), FIELD, LIMITS).shape == (32, 48, 3)
    assert decode_image(webp_declaring(48, 32), FIELD, LIMITS).shape == (32, 48, 3)


def test_limits_above_pillows_ceiling_are_refused() -> None:
    with pytest.raises(ValueError, match="max_pixels"):
        InputLimits(max_pixels=PILLOW_MAX_IMAGE_PIXELS + 1)
    with pytest.raises(ValueError, match="positive"):
        InputLimits(max_bytes=0)


@pytest.mark.parametrize("name", sorted(VALID))
def test_a_valid_file_of_each_format_decodes_to_rgb(name: str) -> None:
    pixels = decode_image(VALID[name], FIELD, LIMITS)
    assert pixels.dtype == np.uint8 and pixels.shape == (32, 48, 3)
    tolerance = 0 if name in ("png", "webp_lossless") else 24
    assert np.abs(pixels.astype(int) - np.asarray(gradient(), dtype=int)).max() <= tolerance


@pytest.mark.parametrize("name", sorted(VALID))
def test_truncations_and_bit_flips_answer_pixels_or_our_error_only(name: str) -> None:
    rng = random.Random(name)
    data = VALID[name]
    variants = [data[:cut] for cut in rng.sample(range(len(data)), 40)]
    for _ in range(120):
        flipped = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            flipped[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        variants.append(bytes(flipped))
    for variant in variants:
        try:
            pixels = decode_image(variant, FIELD, LIMITS)
        except InputImageError as error:
            assert error.field == FIELD
        else:
            assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3


def test_the_exif_orientation_is_applied() -> None:
    # Stored 40 wide and 20 tall, left half red, right half blue; orientation 6 says "rotate 90 degrees clockwise
    # to show": shown 20 wide and 40 tall, the left half on top.
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encoded(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes())
    pixels = decode_image(data, FIELD, LIMITS)
    assert pixels.shape == (40, 20, 3)
    assert tuple(pixels[5, 10]) > (200, 0, 0) and pixels[5, 10, 2] < 60
    assert pixels[35, 10, 2] > 200 and pixels[35, 10, 0] < 60


def test_transparency_is_composited_on_white() -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = (10, 200, 30)  # a colour hidden under full transparency
    rgba[:, 4:, 3] = 255
    pixels = decode_image(encoded(Image.fromarray(rgba), "PNG"), FIELD, LIMITS)
    assert (pixels[:, :4] == 255).all() and (pixels[:, 4:] == (10, 200, 30)).all()


def test_a_palette_with_a_transparent_index_is_composited_on_white() -> None:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    pixels = decode_image(encoded(image, "PNG", transparency=0), FIELD, LIMITS)
    assert tuple(pixels[0, 0]) == (255, 255, 255) and tuple(pixels[1, 1]) == (255, 0, 0)


@pytest.mark.parametrize(("mode", "key"), [("RGB", (10, 200, 30)), ("L", 77)])
def test_a_colour_key_is_composited_on_white(mode: str, key: tuple[int, ...] | int) -> None:
    image = Image.new(mode, (4, 4), key)
    image.putpixel((3, 3), (1, 2, 3) if mode == "RGB" else 5)
    pixels = decode_image(encoded(image, "PNG", transparency=key), FIELD, LIMITS)
    assert (pixels[:3, :3] == 255).all() and tuple(pixels[3, 3]) == ((1, 2, 3) if mode == "RGB" else (5, 5, 5))


def test_sixteen_bit_grey_keeps_its_levels() -> None:
    levels = np.linspace(0, 65535, 16 * 16).astype(np.uint16).reshape(16, 16)
    pixels = decode_image(encoded(Image.fromarray(levels), "PNG"), FIELD, LIMITS)
    assert (pixels[..., 0] == levels >> 8).all() and (pixels[..., 0] == pixels[..., 2]).all()


def test_grey_and_one_bit_images_become_rgb() -> None:
    grey = decode_image(encoded(Image.new("L", (4, 4), 77), "PNG"), FIELD, LIMITS)
    bilevel = decode_image(encoded(Image.new("1", (4, 4), 1), "PNG"), FIELD, LIMITS)
    assert (grey == 77).all() and (bilevel == 255).all() and grey.shape == bilevel.shape == (4, 4, 3)


def test_a_cmyk_jpeg_is_converted_to_rgb() -> None:
    # Cyan-free magenta and yellow ink: red.
    pixels = decode_image(cmyk_jpeg(), FIELD, LIMITS)
    assert pixels.shape == (16, 16, 3)
    assert pixels[8, 8, 0] > 230 and pixels[8, 8, 1] < 30 and pixels[8, 8, 2] < 30


def test_an_embedded_icc_profile_is_ignored() -> None:
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    pixels = decode_image(encoded(gradient(), "PNG", icc_profile=profile), FIELD, LIMITS)
    assert (pixels == np.asarray(gradient())).all()


def test_a_jpeg_with_data_appended_is_its_picture() -> None:
    pixels = decode_image(VALID["jpeg"] + b"PK\x03\x04" + b"\0" * 100, FIELD, LIMITS)
    assert (pixels == decode_image(VALID["jpeg"], FIELD, LIMITS)).all()


@pytest.mark.parametrize(
    ("data", "kind"),
    [(VALID["png"], "PNG"), (VALID["jpeg"], "JPEG"), (VALID["webp"], "WEBP"), (b"GIF89a", None), (b"RIFF", None)],
)
def test_the_format_is_told_by_the_leading_bytes(data: bytes, kind: str | None) -> None:
    assert sniff(data) == kind


def mask_png(mask: np.ndarray) -> bytes:
    return encoded(Image.fromarray(mask.astype(np.uint8)), "PNG")


def test_a_mask_is_thresholded_at_half() -> None:
    levels = np.array([[0, 127, 128, 255]], np.uint8)
    mask = decode_mask(mask_png(levels), "mask", LIMITS, (4, 1))
    assert mask.dtype == np.bool_ and mask.tolist() == [[False, False, True, True]]


def test_a_colour_mask_is_thresholded_on_its_luma() -> None:
    rgb = np.array([[(255, 255, 255), (255, 0, 0), (0, 255, 0), (0, 0, 0)]], np.uint8)
    mask = decode_mask(encoded(Image.fromarray(rgb), "PNG"), "mask", LIMITS, (4, 1))
    # Luma 255, 76, 150, 0.
    assert mask.tolist() == [[True, False, True, False]]


def test_a_mask_painted_on_a_transparent_layer_repaints_where_it_is_painted() -> None:
    rgba = np.zeros((1, 4, 4), np.uint8)
    rgba[0, :, :3] = 255
    rgba[0, 2:, 3] = 255
    mask = decode_mask(encoded(Image.fromarray(rgba), "PNG"), "mask", LIMITS, (4, 1))
    assert mask.tolist() == [[False, False, True, True]]


def test_a_mask_of_another_size_is_refused() -> None:
    with pytest.raises(InputImageError) as caught:
        decode_mask(mask_png(np.full((8, 8), 255)), "mask", LIMITS, (8, 9))
    assert caught.value.rule == "mask_size" and caught.value.field == "mask"


def test_a_mask_that_repaints_nothing_is_refused() -> None:
    with pytest.raises(InputImageError) as caught:
        decode_mask(mask_png(np.full((8, 8), 127)), "mask", LIMITS, (8, 8))
    assert caught.value.rule == "mask_empty"


def test_a_hostile_mask_is_refused_like_an_image() -> None:
    with pytest.raises(InputImageError) as caught:
        decode_mask(png_declaring(100_000, 100_000), "mask", LIMITS, (8, 8))
    assert caught.value.rule == "pixels" and caught.value.field == "mask"


# diffusers' `VaeImageProcessor` (diffusers/image_processor.py, which needs torch to import) resizes a PIL image with
# `image.resize((width, height), resample=PIL_INTERPOLATION[self.config.resample],
# reducing_gap=self.config.reducing_gap)`, its SDXL pipelines building it with the defaults `resample="lanczos"`,
# `reducing_gap=None`; the mask processor the same, then `binarize`: values / 255 below 0.5 become 0, the rest 1. It
# normalizes `np.array(image) / 255.0` (float32) to `2.0 * x - 1.0`.


def test_resize_is_pillows_lanczos_as_diffusers_resizes() -> None:
    image = np.asarray(gradient(48, 32))
    expected = Image.fromarray(image).resize((40, 24), resample=Image.Resampling.LANCZOS, reducing_gap=None)
    bicubic = Image.fromarray(image).resize((40, 24), resample=Image.Resampling.BICUBIC)
    assert (resize_to(image, 40, 24) == np.asarray(expected)).all()
    assert (resize_to(image, 40, 24) != np.asarray(bicubic)).any()
    assert resize_to(image, 48, 32) is image


def test_a_mask_resizes_as_diffusers_mask_processor() -> None:
    mask = np.zeros((32, 48), bool)
    mask[8:20, 10:30] = True
    grey = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8))
    levels = np.asarray(grey.resize((24, 16), resample=Image.Resampling.LANCZOS)).astype(np.float32) / 255.0
    resized = resize_mask_to(mask, 24, 16)
    assert resized.shape == (16, 24) and (resized == (levels >= 0.5)).all()
    assert resized[5, 10] and not resized[12, 2]


def test_model_input_maps_levels_to_minus_one_to_one_in_nchw() -> None:
    image = np.asarray(gradient(16, 8))
    expected = (2.0 * (image.astype(np.float32) / 255.0) - 1.0).transpose(2, 0, 1)[None]
    result = to_model_input(image)
    assert result.dtype == np.float32 and result.shape == (1, 3, 8, 16)
    assert (result == expected).all()
    assert to_model_input(np.array([[[0, 255, 128]]], np.uint8)).ravel().tolist()[:2] == [-1.0, 1.0]


def test_a_jpeg_with_extra_pictures_is_its_primary_picture() -> None:
    # MPO, as phones write a photo with its depth map: the file opens as one picture with more behind it.
    data = encoded(gradient(), "MPO", save_all=True, append_images=[Image.new("RGB", (48, 32), (0, 0, 255))])
    assert sniff(data) == "JPEG" and Image.open(io.BytesIO(data)).format == "MPO"
    pixels = decode_image(data, FIELD, LIMITS)
    assert np.abs(pixels.astype(int) - np.asarray(gradient(), dtype=int)).max() <= 24


def test_an_edit_mask_repaints_where_it_is_fully_transparent_and_needs_an_alpha_channel() -> None:
    """OpenAI's edits: alpha 0 is repainted, whatever the colour; partly transparent is kept; no alpha is refused."""
    rgba = np.zeros((32, 48, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[4:12, 6:20, 3] = 0
    rgba[20:24, 30:40, 3] = 128  # half transparent: kept
    mask = decode_mask(encoded(Image.fromarray(rgba, "RGBA"), "PNG"), "mask", InputLimits(), (48, 32), transparent=True)
    expected = np.zeros((32, 48), dtype=bool)
    expected[4:12, 6:20] = True
    np.testing.assert_array_equal(mask, expected)
    with pytest.raises(InputImageError) as caught:
        decode_mask(encoded(gradient(48, 32), "PNG"), "mask", InputLimits(), (48, 32), transparent=True)
    assert (caught.value.field, caught.value.rule) == ("mask", "mask_alpha")
    opaque = np.full((32, 48, 4), 255, dtype=np.uint8)
    with pytest.raises(InputImageError) as caught:
        decode_mask(encoded(Image.fromarray(opaque, "RGBA"), "PNG"), "mask", InputLimits(), (48, 32), transparent=True)
    assert caught.value.rule == "mask_empty"
