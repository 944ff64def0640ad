"""The image safety checker: the CLIP-based checker of the Stable Diffusion pipelines, run on the devices over a
generated batch before it is encoded.

The architecture is diffusers' `FlaxStableDiffusionSafetyCheckerModule` (a CLIP vision tower, a projection, and
cosine distances to 17 concept and 3 special-care embeddings against per-concept thresholds). The weights are
read from a safetensors file in the PyTorch layout the published checker ships in
(`vision_model.vision_model...`, `visual_projection.weight`, `concept_embeds`, ...), with numpy and
transformers' own renaming: no torch. The checker is a jitted function of its own, compiled at start for each
served size; a flagged image is replaced (black, or blurred) and reported per image (docs/safety.md).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageFilter

from common.protocol import Size
from worker.safetensors_files import SafetensorsFile

logger = logging.getLogger(__name__)

Replace = Literal["black", "blur"]
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# CLIP's image preprocessing (transformers' CLIPImageProcessor defaults).
_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
_BLUR_RADIUS_FRACTION = 1 / 16  # of the image's width: no shape is left to make out


class SafetyCheckerError(ValueError):
    """The checker's folder, config or weights cannot be used; the message names what is wrong."""


@dataclass(frozen=True)
class Screened:
    """A batch after the checker: the images to deliver (flagged ones replaced) and which were flagged."""

    pixels: np.ndarray
    nsfw: list[bool]


class SafetyChecker:
    """A loaded checker: `check` flags images, `screen` also replaces the flagged ones."""

    def __init__(self, module: Any, params: Any, image_size: int, replace: Replace = "black") -> None:
        self._params = jax.device_put(params)
        self._image_size = image_size
        self._replace = replace
        self._flags = jax.jit(lambda params, pixels: module.apply({"params": params}, _clip_input(pixels, image_size)))

    @classmethod
    def load(cls, folder: Path, replace: Replace = "black") -> SafetyChecker:
        """The checker in `folder` (`config.json`, a transformers CLIPConfig, and `model.safetensors`)."""
        from transformers import CLIPConfig

        config = CLIPConfig.from_dict(_read_config(folder))
        module = checker_module(config)
        size = config.vision_config.image_size
        shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))["params"]
        params = read_params(folder / WEIGHTS_NAME, shapes)
        logger.info("safety checker loaded from %s (CLIP vision at %dx%d)", folder, size, size)
        return cls(module, params, size, replace)

    def compile(self, size: Size, batch: int) -> None:
        """Compile and run the check once for batches of `batch` images of `size`."""
        self.check(np.zeros((batch, size.height, size.width, 3), dtype=np.uint8))

    def check(self, pixels: np.ndarray) -> np.ndarray:
        """Which of a uint8 N x H x W x 3 batch the checker flags (bool, N)."""
        flags: np.ndarray = np.asarray(jax.device_get(self._flags(self._params, pixels)))
        return flags

    def screen(self, pixels: np.ndarray) -> Screened:
        """The batch with its flagged images replaced, and the flags."""
        flags = self.check(pixels)
        if not flags.any():
            return Screened(pixels, [False] * len(flags))
        out = pixels.copy()
        for index in np.flatnonzero(flags):
            out[index] = replacement(pixels[index], self._replace)
        return Screened(out, [bool(flag) for flag in flags])


def checker_module(config: Any) -> Any:
    """diffusers' `FlaxStableDiffusionSafetyCheckerModule` for `config` (a transformers CLIPConfig), its parameters
    as they are; its verdict is restated here because diffusers 0.39 calls `jnp.clip(a_min=...)`, which this
    JAX no longer takes."""
    from diffusers.pipelines.stable_diffusion.safety_checker_flax import FlaxStableDiffusionSafetyCheckerModule

    class Module(FlaxStableDiffusionSafetyCheckerModule):  # type: ignore[misc]
        def __call__(self, clip_input: jax.Array) -> jax.Array:
            return _verdict(self, clip_input)

    return Module(config)


def _verdict(checker: Any, clip_input: jax.Array) -> jax.Array:
    """The checker's verdict per image, as diffusers computes it (adjustment 0, scores rounded to 3 places)."""
    image_embeds = checker.visual_projection(checker.vision_model(clip_input)[1])
    special = jnp.round(_cosine(image_embeds, checker.special_care_embeds) - checker.special_care_embeds_weights, 3)
    # An image near a special-care concept is held to a lower threshold on every concept.
    special_adjustment = jnp.any(special > 0, axis=1, keepdims=True) * 0.01
    scores = _cosine(image_embeds, checker.concept_embeds) - checker.concept_embeds_weights + special_adjustment
    return jnp.any(jnp.round(scores, 3) > 0, axis=1)


def _cosine(a: jax.Array, b: jax.Array, eps: float = 1e-12) -> jax.Array:
    a = a / jnp.clip(jnp.linalg.norm(a, axis=1, keepdims=True), min=eps)
    b = b / jnp.clip(jnp.linalg.norm(b, axis=1, keepdims=True), min=eps)
    return a @ b.T


def replacement(image: np.ndarray, replace: Replace) -> np.ndarray:
    """What a flagged image is delivered as: black, or blurred past recognition."""
    if replace == "black":
        return np.zeros_like(image)
    radius = max(2.0, image.shape[1] * _BLUR_RADIUS_FRACTION)
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))


def _clip_input(pixels: jax.Array, image_size: int) -> jax.Array:
    """CLIP's preprocessing on the device: the centre square, resized to the tower's size, normalised (NHWC)."""
    height, width = pixels.shape[1], pixels.shape[2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = pixels[:, top : top + side, left : left + side, :].astype(jnp.float32) / 255.0
    resized = jax.image.resize(square, (pixels.shape[0], image_size, image_size, 3), method="cubic")
    normalised: jax.Array = (resized - _MEAN) / _STD
    return normalised


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        config: dict[str, Any] = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SafetyCheckerError(f"cannot read the safety checker's {folder / CONFIG_NAME}: {exc}") from None
    return config


def read_params(path: Path, shapes: Any) -> Any:
    """The checker's parameters from a PyTorch-layout safetensors file, renamed and reshaped as transformers'
    `from_pt=True` does, checked against the architecture's `shapes` (float32)."""
    from flax.traverse_util import flatten_dict, unflatten_dict
    from transformers.modeling_flax_pytorch_utils import rename_key_and_reshape_tensor

    expected = flatten_dict(shapes)  # type: ignore[no-untyped-call]
    params: dict[tuple[str, ...], np.ndarray] = {}
    try:
        with SafetensorsFile(path) as tensors:
            for name in tensors.keys():
                key, array = rename_key_and_reshape_tensor(tuple(name.split(".")), tensors.read(name), expected, "")
                if tuple(key) in expected:
                    params[tuple(key)] = np.asarray(array, dtype=np.float32)
    except OSError as exc:
        raise SafetyCheckerError(f"cannot read the safety checker's weights {path}: {exc}") from None
    _check_complete(path, params, expected)
    return unflatten_dict(params)  # type: ignore[no-untyped-call]


def _check_complete(path: Path, params: dict[tuple[str, ...], np.ndarray], expected: dict[Any, Any]) -> None:
    missing = ["/".join(key) for key in expected if key not in params]
    if missing:
        raise SafetyCheckerError(f"{path}: {len(missing)} parameters missing, first {', '.join(missing[:3])}")
    wrong = ["/".join(key) for key, array in params.items() if tuple(array.shape) != tuple(expected[key].shape)]
    if wrong:
        raise SafetyCheckerError(f"{path}: parameters of another shape than the config's, first {wrong[0]}")
