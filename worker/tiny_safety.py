"""Write a tiny safety checker with random weights: the Stable Diffusion checker's architecture (a CLIP vision
tower, a projection, concept embeddings and thresholds) at a few thousand parameters, in the PyTorch layout of
the published checker's `model.safetensors`, so that it loads through the same path.

Its verdicts are set by its thresholds, not by what an image shows: a threshold of -2 flags every image (a
cosine similarity is never below -1), +2 flags none.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from worker.safety import CONFIG_NAME, WEIGHTS_NAME, checker_module

FLAG_ALL, FLAG_NONE = -2.0, 2.0
_VISION = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}
_TEXT = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2}
_PROJECTION_DIM = 16


def write_tiny_safety_checker(folder: Path, threshold: float, seed: int = 0) -> Path:
    """Write `config.json` and `model.safetensors` to `folder`; every concept's threshold is `threshold`."""
    from flax.traverse_util import flatten_dict
    from safetensors.numpy import save_file
    from transformers import CLIPConfig

    config = CLIPConfig(text_config=_TEXT, vision_config=_VISION, projection_dim=_PROJECTION_DIM)
    module = checker_module(config)
    size = _VISION["image_size"]
    params = module.init(jax.random.key(seed), jnp.zeros((1, size, size, 3)))["params"]
    flat = {key: np.asarray(value, dtype=np.float32) for key, value in flatten_dict(params).items()}  # type: ignore[no-untyped-call]
    for name in ("concept_embeds_weights", "special_care_embeds_weights"):
        flat[(name,)] = np.full_like(flat[(name,)], threshold)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=1), encoding="utf-8")
    save_file(dict(pytorch_named(key, array) for key, array in flat.items()), str(folder / WEIGHTS_NAME))
    return folder


def pytorch_named(key: tuple[str, ...], array: np.ndarray) -> tuple[str, np.ndarray]:
    """A Flax parameter under its PyTorch name and layout (the inverse of transformers' `from_pt` renaming)."""
    *path, last = key
    tensor: Any = array
    if last == "kernel":
        last, tensor = "weight", array.transpose(3, 2, 0, 1) if array.ndim == 4 else array.T
    elif last in ("scale", "embedding"):
        last = "weight"
    return ".".join([*path, last]), np.ascontiguousarray(tensor)
