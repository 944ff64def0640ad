"""The SDXL 1.0 base architecture, written down here, with random weights made on the devices.

`--model sdxl-random` measures speed where the weights cannot be downloaded: the components have the
configurations published with `stabilityai/stable-diffusion-xl-base-1.0` (its `unet/`, `vae/`,
`text_encoder/` and `text_encoder_2/` `config.json`), and the weights are drawn by the model's own
initialisers on each device, already cast to bfloat16, so the 10 GB of float32 UNet weights never exist
on the host. Speed does not depend on weight values; the images are noise.

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


def random_replicated_params(parts: Mapping[str, Any], seed: int = 0, dtype: Any = jnp.bfloat16) -> dict[str, Any]:
    """Random parameters drawn on every local device (the same key on each, so the copies are equal),
    cast there, with the leading device axis `pmap` maps over. The scheduler state is not included."""
    devices = jax.local_device_count()
    params = {}
    for offset, (name, init) in enumerate(initialisers(parts).items()):

        def cast_init(key: jax.Array, init: Callable[[jax.Array], Any] = init) -> Any:
            return jax.tree_util.tree_map(lambda w: w.astype(dtype), init(key))

        keys = jnp.broadcast_to(jax.random.PRNGKey(seed + offset), (devices, 2))
        params[name] = jax.pmap(cast_init)(keys)
        logger.info(
            "initialised %s on %d devices: %.3fB parameters",
            name,
            devices,
            parameter_count(params[name]) / devices / 1e9,
        )
    return params
