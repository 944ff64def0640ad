"""Write a tiny SDXL-architecture pipeline with random weights, in diffusers' on-disk format.

Two CLIP text encoders (the second with a projection, as in SDXL) and their byte-level BPE tokenizers,
a UNet with SDXL's `text_time` added conditioning, a VAE and an Euler scheduler: the same component
classes as `stabilityai/stable-diffusion-xl-base-1.0`, loaded by the same `from_pretrained` call, small
enough to load, compile and warm up in seconds on a CPU. Its images are noise.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax

from worker.img2img import INPAINTING_IN_CHANNELS, LATENT_CHANNELS

logger = logging.getLogger(__name__)

TEXT_HIDDEN = 32
ADDITION_TIME_EMBED_DIM = 8
MAX_TOKENS = 77
# The UNet's native latent side; with the VAE's factor of 2 the native image is 64x64.
LATENT_SIDE = 32
# Set in the model_index.json of the folder written here: a worker that loads it says so in the registry, and
# the demo page warns that its images are noise. diffusers skips keys starting with `_` when it loads a pipeline.
TINY_MARKER = "_sdxl_serve_tiny_random_weights"


def write_tiny_model(directory: Path, seed: int = 0, inpainting: bool = False) -> Path:
    """Write the model to `directory` (atomically: a partly written model is never left there). With `inpainting`,
    its UNet takes 9 input channels (latents, mask, masked-image latents), as SDXL inpainting checkpoints'."""
    from worker.quiet import silence_flax_deprecation

    silence_flax_deprecation()
    from diffusers import FlaxStableDiffusionXLPipeline

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-model-", dir=directory.parent))
    try:
        keys = jax.random.split(jax.random.PRNGKey(seed), 4)
        components, params = _components(staging, keys, inpainting)
        pipeline = FlaxStableDiffusionXLPipeline(**components)
        logger.info("tiny model: saving")
        pipeline.save_pretrained(staging / "model", params=params)
        _mark_tiny(staging / "model")
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging / "model", directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("wrote tiny SDXL model to %s", directory)
    return directory


def _mark_tiny(folder: Path) -> None:
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index[TINY_MARKER] = True
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def is_tiny_model(model: str) -> bool:
    """Whether `model` is a folder this module wrote (random weights); False for anything else, unreadable
    included."""
    try:
        index = json.loads((Path(model).expanduser() / "model_index.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(index, dict) and index.get(TINY_MARKER) is True


def _components(staging: Path, keys: Any, inpainting: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    tokenizer, tokenizer_2, vocab_size = byte_level_tokenizers(staging / "vocab")
    # Each part takes seconds to tens of seconds on a CPU: say which one a person is waiting for.
    logger.info("tiny model: making the text encoders (1/3)")
    (text_encoder, text_params), (text_encoder_2, text_params_2) = _text_encoders(vocab_size, tokenizer)
    logger.info("tiny model: making the UNet (2/3)")
    unet, unet_params = _unet(keys[0], INPAINTING_IN_CHANNELS if inpainting else LATENT_CHANNELS)
    logger.info("tiny model: making the VAE (3/3)")
    vae, vae_params = _vae(keys[1])
    components = {
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "unet": unet,
        "vae": vae,
        "scheduler": euler_scheduler(),
    }
    params = {"text_encoder": text_params, "text_encoder_2": text_params_2, "unet": unet_params, "vae": vae_params}
    return components, params


def byte_level_tokenizers(directory: Path) -> tuple[Any, Any, int]:
    """Byte-level BPE tokenizers with no merges: every byte is a token, as CLIP's alphabet."""
    from transformers import CLIPTokenizer
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    directory.mkdir(parents=True)
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    files = {"vocab_file": str(directory / "vocab.json"), "merges_file": str(directory / "merges.txt")}
    # SDXL's second tokenizer pads with "!" rather than the end-of-text token.
    return (
        CLIPTokenizer(**files, model_max_length=MAX_TOKENS),
        CLIPTokenizer(**files, model_max_length=MAX_TOKENS, pad_token="!"),
        len(tokens),
    )


def _text_encoders(vocab_size: int, tokenizer: Any) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
    from transformers import CLIPTextConfig, FlaxCLIPTextModel, FlaxCLIPTextModelWithProjection

    config = CLIPTextConfig(
        hidden_size=TEXT_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=vocab_size,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=TEXT_HIDDEN,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=1,
    )
    encoders = []
    for cls, seed in ((FlaxCLIPTextModel, 1), (FlaxCLIPTextModelWithProjection, 2)):
        model = cls(config, _do_init=False)
        # One compiled init instead of hundreds of eagerly dispatched ops: seconds, not tens of seconds.
        params = jax.jit(model.init_weights, static_argnums=1)(jax.random.PRNGKey(seed), (1, MAX_TOKENS))
        encoders.append((model, params))
    return encoders[0], encoders[1]


def _unet(key: Any, in_channels: int) -> tuple[Any, Any]:
    from diffusers import FlaxUNet2DConditionModel

    unet = FlaxUNet2DConditionModel(
        sample_size=LATENT_SIDE,
        in_channels=in_channels,
        out_channels=LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 1),
        use_linear_projection=True,
        # Both encoders' hidden states are concatenated into the cross-attention context.
        cross_attention_dim=2 * TEXT_HIDDEN,
        addition_embed_type="text_time",
        addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
        # Six time ids, each embedded, plus the pooled text embedding of the second encoder.
        projection_class_embeddings_input_dim=6 * ADDITION_TIME_EMBED_DIM + TEXT_HIDDEN,
    )
    return unet, jax.jit(unet.init_weights)(key)


def _vae(key: Any) -> tuple[Any, Any]:
    from diffusers import FlaxAutoencoderKL

    vae = FlaxAutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=2 * LATENT_SIDE,
        scaling_factor=0.13025,
    )
    return vae, jax.jit(vae.init_weights)(key)


def euler_scheduler() -> Any:
    from diffusers import FlaxEulerDiscreteScheduler

    # SDXL base's scheduler settings.
    return FlaxEulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
    )
