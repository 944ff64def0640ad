"""The SDXL 1.0 base architecture, written down here, with random weights made on the devices.

`--model sdxl-random` measures speed where the weights cannot be downloaded: the components have the
configurations published with `stabilityai/stable-diffusion-xl-base-1.0` (its `unet/`, `vae/`,
`text_encoder/` and `text_encoder_2/` `config.json`), and the weights are drawn on the host in bfloat16,
one array at a time, from the parameter shapes alone: the 10 GB of float32 UNet weights never exist, nor
the initialiser's program (23 GB on XLA:CPU). Speed does not depend on weight values; the images are noise.

The tokenizers are the tiny model's byte-level ones (every id they produce is a valid CLIP token id):
tokenizing costs the same and runs on the host, outside what is measured.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from worker.flops import abstract_array

logger = logging.getLogger(__name__)

RANDOM_MODEL = "sdxl-random"
TEXT_TOKENS = 77

# unet/config.json of SDXL base. `attention_head_dim` is, despite its name, the number of heads per level
# (5, 10, 20 heads of 64 channels), as diffusers reads it.
SDXL_UNET: Mapping[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "attention_head_dim": (5, 10, 20),
    "transformer_layers_per_block": (1, 2, 10),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
# vae/config.json of SDXL base (the encoder is part of the model and of its parameter count).
SDXL_VAE: Mapping[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "sample_size": 1024,
    "scaling_factor": 0.13025,
}
# text_encoder/config.json: the text tower of OpenAI CLIP ViT-L/14.
SDXL_TEXT: Mapping[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": TEXT_TOKENS,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "layer_norm_eps": 1e-5,
}
# text_encoder_2/config.json: the text tower of OpenCLIP ViT-bigG/14, with its projection.
SDXL_TEXT_2: Mapping[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": TEXT_TOKENS,
    "hidden_act": "gelu",
    "projection_dim": 1280,
    "layer_norm_eps": 1e-5,
}


@dataclass(frozen=True)
class Architecture:
    """The configuration of each component of an SDXL pipeline."""

    unet: Mapping[str, Any] = field(default_factory=lambda: SDXL_UNET)
    vae: Mapping[str, Any] = field(default_factory=lambda: SDXL_VAE)
    text_encoder: Mapping[str, Any] = field(default_factory=lambda: SDXL_TEXT)
    text_encoder_2: Mapping[str, Any] = field(default_factory=lambda: SDXL_TEXT_2)


SDXL_BASE = Architecture()


def components(arch: Architecture = SDXL_BASE, dtype: Any = jnp.bfloat16) -> dict[str, Any]:
    """The modules of a `FlaxStableDiffusionXLPipeline` (keyword arguments of its constructor), no weights."""
    from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel
    from transformers import CLIPTextConfig, FlaxCLIPTextModel, FlaxCLIPTextModelWithProjection

    from worker.tiny_model import byte_level_tokenizers, euler_scheduler

    with tempfile.TemporaryDirectory(prefix="sdxl-random-") as scratch:
        # The vocabulary is read into memory here; the files are not needed afterwards.
        tokenizer, tokenizer_2, _ = byte_level_tokenizers(Path(scratch) / "vocab")
    token_ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": 1}
    text = CLIPTextConfig(**arch.text_encoder, **token_ids)
    text_2 = CLIPTextConfig(**arch.text_encoder_2, **token_ids)
    return {
        "text_encoder": FlaxCLIPTextModel(text, _do_init=False, dtype=dtype),
        "text_encoder_2": FlaxCLIPTextModelWithProjection(text_2, _do_init=False, dtype=dtype),
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "unet": FlaxUNet2DConditionModel(**arch.unet, split_head_dim=True, dtype=dtype),
        "vae": FlaxAutoencoderKL(**arch.vae, dtype=dtype),
        "scheduler": euler_scheduler(),
    }


def initialisers(parts: Mapping[str, Any]) -> dict[str, Callable[[jax.Array], Any]]:
    """For each weighted component, a function from a PRNG key to its float32 parameters."""

    def text(model: Any) -> Callable[[jax.Array], Any]:
        return lambda key: model.init_weights(key, (1, TEXT_TOKENS))

    return {
        "text_encoder": text(parts["text_encoder"]),
        "text_encoder_2": text(parts["text_encoder_2"]),
        "unet": parts["unet"].init_weights,
        "vae": parts["vae"].init_weights,
    }


def abstract_params(parts: Mapping[str, Any]) -> dict[str, Any]:
    """Every component's parameters as shapes and dtypes only (`jax.eval_shape`): nothing is allocated."""
    key = abstract_array((2,), jnp.uint32)
    return {name: jax.eval_shape(init, key) for name, init in initialisers(parts).items()}


def parameter_count(tree: Any) -> int:
    """Number of scalars in a tree of arrays or `ShapeDtypeStruct`s."""
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


# Random weights are slices of one pool of normal draws (speed does not depend on their values; drawing
# 2.6B fresh normals takes minutes on a small host, slicing seconds).
POOL_SIZE = 1 << 22


def random_host_params(
    parts: Mapping[str, Any],
    seed: int = 0,
    dtype: Any = jnp.bfloat16,
    place: Callable[[np.ndarray], Any] = lambda array: array,
) -> dict[str, Any]:
    """Random parameters of every weighted component in `dtype`, made on the host one array at a time from
    the shapes alone, each handed to `place` (for example, put on the devices) before the next is made: no
    initialiser runs, so the 10 GB of float32 UNet weights (and the 23 GB XLA:CPU's init program needs) never
    exist, nor a second full copy of the weights. Kernels and embeddings are normal with a 1/sqrt(fan-in)
    spread, norm scales one, biases zero, so activations stay finite. The scheduler state is not included.
    """
    rng = np.random.default_rng(seed)
    pool = np.tile(rng.standard_normal(POOL_SIZE, dtype=np.float32), 2)  # twice, so any window is one slice
    params = {}
    for name, tree in abstract_params(parts).items():
        params[name] = jax.tree_util.tree_map_with_path(
            lambda path, leaf: place(_draw(rng, pool, path, leaf, dtype)), tree
        )
        logger.info("drew %s on the host: %.3fB parameters", name, parameter_count(tree) / 1e9)
    return params


def _draw(rng: np.random.Generator, pool: np.ndarray, path: Any, leaf: Any, dtype: Any) -> np.ndarray:
    kind = str(getattr(path[-1], "key", path[-1]))
    if kind == "bias":
        return np.zeros(leaf.shape, dtype)
    if kind == "scale":
        return np.ones(leaf.shape, dtype)
    fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 1
    size = int(np.prod(leaf.shape))
    start = int(rng.integers(0, POOL_SIZE))
    window = pool[start : start + min(size, POOL_SIZE)]  # the pool from a random place, repeated as needed
    normal = np.resize(window, size) * np.float32(1.0 / np.sqrt(max(fan_in, 1)))
    return normal.astype(dtype).reshape(leaf.shape)
