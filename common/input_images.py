"""Images a request sends (an init image, an inpainting mask), decoded from untrusted bytes into pixels.

The gateway decodes them to refuse a bad one with a 400 before it queues anything; the worker decodes them again
(it trusts no queue). Every refusal is one exception, `InputImageError`, naming the request's field and the rule.

What is accepted, and why:

- PNG, JPEG and WebP only, told by their leading bytes (never by a filename or a content type), and parsed only by
  that format's decoder: a file that claims to be a PNG is never handed to another of Pillow's many parsers, so a
  polyglot is decoded as the format its first bytes name or refused. Data after a complete image (a ZIP appended to
  a JPEG) is ignored: only pixels go on, the bytes are never stored or served back.
- Limits in order of cost: the byte size before anything is parsed; the width, height and pixel count from the
  header, before a pixel is decoded (Pillow's `Image.open` reads only the header), so a small file that declares a
  huge image (a decompression bomb) is refused without the memory it asks for. Pillow's own bomb check is set to
  `PILLOW_MAX_IMAGE_PIXELS`, above any limit `InputLimits` allows, as a backstop; what it raises becomes our error.
- Animated images (APNG, animated WebP) are refused: which frame to use would be a guess the caller should make. A
  JPEG with extra pictures (MPO: a phone's depth map or thumbnails) is its primary picture, as every viewer shows it.
- The EXIF orientation is applied, so the pixels are the picture as a viewer shows it (a phone's portrait photo is
  stored sideways).
- Colour: any mode becomes 8-bit RGB. 16-bit grey is scaled to 8 bits (Pillow's conversion would clip it to white).
  CMYK is converted by Pillow's formula (no colour management: embedded ICC profiles are ignored, as diffusers'
  `convert("RGB")` ignores them). Transparency is composited on white: the colour a transparent pixel hides is
  undefined (often black, sometimes what was erased: dropping alpha could show it), and white is what a page
  shows behind it.
- A mask is one channel (luma), composited on black (a mask painted on a transparent layer, as drawing tools
  export it, repaints where it is painted), then thresholded at 50% as diffusers' mask processor binarizes: white
  (>= 128) is repainted, black kept. Its size must be the image's, and it must repaint something.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

Rule = Literal["bytes", "format", "pixels", "corrupt", "animated", "mask_size", "mask_empty", "mask_alpha"]

# The most pixels any `InputLimits` may allow (an 8192x8192 image is 256 MiB of RGB). Pillow's own check warns
# above MAX_IMAGE_PIXELS and raises above twice that: set to this, it can only fire for images the limits refuse.
PILLOW_MAX_IMAGE_PIXELS = 8192 * 8192
Image.MAX_IMAGE_PIXELS = PILLOW_MAX_IMAGE_PIXELS
# A bomb is never a log line in a server: Pillow's warning becomes an exception, which `decode_image` refuses.
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)

_Format = Literal["PNG", "JPEG", "WEBP"]
# Pillow's names for what each accepted format may open as (a JPEG with extra pictures opens as MPO).
_OPENS_AS: dict[_Format, frozenset[str]] = {
    "PNG": frozenset({"PNG"}),
    "JPEG": frozenset({"JPEG", "MPO"}),
    "WEBP": frozenset({"WEBP"}),
}
# Leading bytes of formats that are refused, to say what was sent.
_REFUSED_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"<?xml", "XML (SVG?)"),
    (b"<svg", "SVG"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
)
_MASK_THRESHOLD = 128  # diffusers binarizes value/255 < 0.5 to 0: 128/255 is the first level kept as 1.


class InputImageError(ValueError):
    """An input image was refused: `field` is the request's field, `rule` which check it failed."""

    def __init__(self, field: str, rule: Rule, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.rule = rule
        self.message = message


@dataclass(frozen=True)
class InputLimits:
    """How large an input image may be: its encoded bytes, either side, and its pixel count."""

    max_bytes: int = 20 * 1024 * 1024
    max_side: int = 4096
    max_pixels: int = 4096 * 4096

    def __post_init__(self) -> None:
        if min(self.max_bytes, self.max_side, self.max_pixels) < 1:
            raise ValueError(f"input image limits must be positive, got {self}")
        if self.max_pixels > PILLOW_MAX_IMAGE_PIXELS:
            raise ValueError(f"max_pixels may be at most {PILLOW_MAX_IMAGE_PIXELS}, got {self.max_pixels}")


def sniff(data: bytes) -> _Format | None:
    """The accepted format `data` starts with, or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def decode_image(data: bytes, field: str, limits: InputLimits) -> np.ndarray:
    """The picture in `data` as uint8 RGB, shape [height, width, 3], oriented as its EXIF tag says."""
    with _opened(data, field, limits) as image:
        return _rgb(image, background=255)


def decode_mask(
    data: bytes, field: str, limits: InputLimits, size: tuple[int, int], *, transparent: bool = False
) -> np.ndarray:
    """The inpainting mask in `data` as a bool array [height, width], True where the image is repainted: white
    (diffusers' convention), or with `transparent` fully transparent (alpha 0: OpenAI's image edits, whose masks
    must carry an alpha channel). `size` is the image's (width, height): a mask of another size is refused, as is one
    that repaints nothing."""
    with _opened(data, field, limits) as image:
        mask = _transparent(image, field) if transparent else _white(image)
    if (mask.shape[1], mask.shape[0]) != tuple(size):
        raise InputImageError(
            field, "mask_size", f"the mask is {mask.shape[1]}x{mask.shape[0]}, the image {size[0]}x{size[1]}"
        )
    if not mask.any():
        what = "fully transparent" if transparent else "white"
        raise InputImageError(field, "mask_empty", f"the mask has no {what} pixel: nothing would be repainted")
    return mask


def _white(image: Image.Image) -> np.ndarray:
    luma = Image.fromarray(_rgb(image, background=0)).convert("L")
    return np.asarray(luma) >= _MASK_THRESHOLD


def _transparent(image: Image.Image, field: str) -> np.ndarray:
    if "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode not in ("RGBA", "LA", "PA", "La", "RGBa"):
        raise InputImageError(
            field,
            "mask_alpha",
            "an edit's mask marks what to repaint as fully transparent (alpha 0); this mask has no alpha channel",
        )
    alpha = np.asarray(image.convert("RGBA"), dtype=np.uint8)[:, :, 3]
    transparent: np.ndarray = np.equal(alpha, 0)
    return transparent


def _opened(data: bytes, field: str, limits: InputLimits) -> Image.Image:
    """The decoded, oriented image (a context manager that closes it), or the refusal."""
    if not data:
        raise InputImageError(field, "bytes", "the image is empty")
    if len(data) > limits.max_bytes:
        raise InputImageError(field, "bytes", f"the image is {len(data)} bytes, over the limit of {limits.max_bytes}")
    kind = sniff(data)
    if kind is None:
        raise InputImageError(field, "format", f"{_what(data)} is not accepted: send PNG, JPEG or WebP")
    try:
        # Hostile bytes go into a third-party parser here: whatever it raises means they are not a usable image.
        return _decode(data, kind, field, limits)
    except InputImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise InputImageError(field, "pixels", f"the image declares too many pixels ({error})") from None
    except Exception as error:
        raise InputImageError(field, "corrupt", f"not a readable {kind} image ({type(error).__name__})") from None


def _what(data: bytes) -> str:
    for magic, name in _REFUSED_MAGIC:
        if data.startswith(magic):
            return name
    if data[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif"):
        return "HEIC/AVIF"
    return "this file type"


def _decode(data: bytes, kind: _Format, field: str, limits: InputLimits) -> Image.Image:
    """Open (header only), check the declared size, then decode and orient."""
    image = Image.open(io.BytesIO(data), formats=[kind])
    if image.format not in _OPENS_AS[kind]:
        raise InputImageError(field, "format", f"the file starts as {kind} but reads as {image.format}")
    _check_size(image.size, field, limits)
    frames = int(getattr(image, "n_frames", 1))
    if frames > 1 and image.format != "MPO":
        raise InputImageError(field, "animated", f"the image has {frames} frames: send a single picture")
    image.load()
    oriented = ImageOps.exif_transpose(image)
    if oriented is not image:
        image.close()
    return oriented


def _check_size(size: tuple[int, int], field: str, limits: InputLimits) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise InputImageError(field, "pixels", f"the image is {width}x{height}: it has no pixels")
    if max(width, height) > limits.max_side or width * height > limits.max_pixels:
        raise InputImageError(
            field,
            "pixels",
            f"the image is {width}x{height}, over the limits of {limits.max_side} a side "
            f"and {limits.max_pixels} pixels",
        )


def _rgb(image: Image.Image, background: int) -> np.ndarray:
    """8-bit RGB, transparency composited on a grey level `background`."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grey: keep the high byte (Pillow's own conversion clips everything above 255 to white).
        grey = (np.asarray(image).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if "transparency" in image.info:
        # A palette index or a colour key (PNG's tRNS for P, L and RGB images): Pillow applies it converting to RGBA.
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (background, background, background, 255))
        image = Image.alpha_composite(flat, rgba)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def resize_to(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """`image` (uint8 [H, W, 3]) resized to `width` x `height` as diffusers' `VaeImageProcessor` resizes an SDXL
    img2img or inpainting input: Pillow's Lanczos filter, no reducing gap, aspect ratio not kept."""
    if image.shape[1] == width and image.shape[0] == height:
        return image
    resized = Image.fromarray(image).resize((width, height), resample=Image.Resampling.LANCZOS, reducing_gap=None)
    return np.asarray(resized, dtype=np.uint8)


def resize_mask_to(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """A bool mask resized as diffusers' mask processor does (Lanczos on the grey levels, then binarized at 50%).
    Its input here is already binary, so a soft-edged mask is thresholded once before and once after the resize,
    where diffusers thresholds only after: the edge may move by a pixel."""
    grey = np.where(mask, np.uint8(255), np.uint8(0))
    resized = Image.fromarray(grey).resize((width, height), resample=Image.Resampling.LANCZOS, reducing_gap=None)
    return np.asarray(resized) >= _MASK_THRESHOLD


def to_model_input(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] as the VAE encoder's input: float32 in [-1, 1], NCHW with a batch of 1 ([1, 3, H, W], the
    layout diffusers' Flax `AutoencoderKL.encode` takes). As diffusers: `x / 255`, then `2x - 1`."""
    scaled = image.astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray((2.0 * scaled - 1.0).transpose(2, 0, 1)[None], dtype=np.float32)
