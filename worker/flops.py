"""What an image costs in floating-point operations, and what a device can do per second.

The count follows the loaded model: each component is traced at the shape asked for, on abstract inputs
(nothing is allocated), and XLA's cost analysis of the result is read. Tracing is pinned to the CPU
backend because XLA answers cost analysis before compilation only there (accelerator plugins answer
after compiling, and would not count a cuDNN attention call at all); the count does not depend on where
it is done. Attention is traced on diffusers' own path, so the count is the model's work, whatever path
runs it.

Per image: the UNet on two samples per step with classifier-free guidance (a guidance scale above 1), on one
without; one VAE decode; both text encoders on one prompt (the negative prompt's encoding is a constant per
distinct negative prompt).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from common.protocol import Shape

logger = logging.getLogger(__name__)

# Dense (no sparsity) bfloat16 peak per device, by a part of JAX's `device_kind`; the first match wins,
# so a more specific name comes before the name it contains. Sources: NVIDIA's H100 and H200 datasheets
# (H100 SXM 989.4, PCIe 756, NVL 835 TFLOP/s; H200 SXM 989, NVL 835: the datasheets' figures "with
# sparsity", halved), the A100 datasheet (312), Google Cloud's TPU pages (v4 275, v5e 197, v5p 459,
# v6e 918 TFLOP/s per chip). JAX names TPU v5e "TPU v5 lite", v5p "TPU v5", v6e "TPU v6 lite".
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("A100", 312.0),
    ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),
    ("TPU v6 lite", 918.0),
)
TERA = 1e12


def peak_tflops(device_kind: str) -> float | None:
    """The device's dense bf16 peak in TFLOP/s, or None for a device not in the table (never a guess)."""
    for name, tflops in PEAK_BF16_TFLOPS:
        if name.lower() in device_kind.lower():
            return tflops
    return None


@dataclass(frozen=True)
class FlopCount:
    """Floating-point operations of one image at one shape, by component, with or without guidance."""

    shape: Shape
    unet_per_sample: float  # one UNet evaluation of one latent (one step, one half of the guidance pair)
    vae_decode: float
    text_encoders: float  # both encoders, one prompt
    guidance: bool = True  # classifier-free guidance: two UNet samples per step, else one

    @property
    def unet_samples_per_step(self) -> int:
        return 2 if self.guidance else 1

    @property
    def unet_per_image(self) -> float:
        return self.unet_samples_per_step * self.shape.steps * self.unet_per_sample

    @property
    def per_image(self) -> float:
        return self.unet_per_image + self.vae_decode + self.text_encoders

    def as_tflop(self) -> dict[str, float]:
        return {
            "unet_per_sample_step": self.unet_per_sample / TERA,
            "unet_per_image": self.unet_per_image / TERA,
            "vae_decode": self.vae_decode / TERA,
            "text_encoders": self.text_encoders / TERA,
            "per_image": self.per_image / TERA,
        }


def count_flops(pipe: Any, params: Mapping[str, Any], shape: Shape, guidance: bool = True) -> FlopCount:
    """Count one image's work for `pipe` (a `FlaxStableDiffusionXLPipeline`) at `shape`, with or without
    classifier-free guidance.

    `params` are one device's parameters: arrays or `ShapeDtypeStruct`s; only shapes and dtypes are read.
    """
    params = abstract(params)
    ids = abstract_array((1, 2, int(pipe.tokenizer.model_max_length)), jnp.int32)
    context, pooled = jax.eval_shape(pipe.get_embeddings, ids, params)
    factor = pipe.vae_scale_factor
    latents = abstract_array(
        (1, pipe.unet.config.in_channels, shape.height // factor, shape.width // factor), jnp.float32
    )
    added = {"text_embeds": pooled, "time_ids": abstract_array((1, 6), context.dtype)}
    timestep = abstract_array((1,), jnp.int32)

    def unet(p: Any, x: Any, t: Any, c: Any, a: Any) -> Any:
        return pipe.unet.apply({"params": p}, x, t, encoder_hidden_states=c, added_cond_kwargs=a).sample

    def decode(p: Any, x: Any) -> Any:
        return pipe.vae.apply({"params": p}, x, method=pipe.vae.decode).sample

    count = FlopCount(
        shape=shape,
        unet_per_sample=traced_flops(unet, params["unet"], latents, timestep, context, added),
        vae_decode=traced_flops(decode, params["vae"], latents),
        text_encoders=traced_flops(pipe.get_embeddings, ids, params),
        guidance=guidance,
    )
    logger.info("FLOPs per image at %s: %s", shape, {k: round(v, 3) for k, v in count.as_tflop().items()})
    return count


def abstract_array(shape: tuple[int, ...], dtype: Any, sharding: Any = None) -> jax.ShapeDtypeStruct:
    """`jax.ShapeDtypeStruct`, typed (JAX's constructor is not)."""
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)  # type: ignore[no-untyped-call]


def abstract(tree: Any) -> Any:
    """Shapes and dtypes of a tree of arrays (or of `ShapeDtypeStruct`s), nothing else."""
    return jax.tree_util.tree_map(lambda x: abstract_array(x.shape, x.dtype), tree)


def traced_flops(fn: Callable[..., Any], *args: Any) -> float:
    """XLA's count of floating-point operations of `fn` on abstract `args`, lowered for the CPU."""
    try:
        cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    except RuntimeError as exc:  # JAX_PLATFORMS left the CPU backend out
        raise RuntimeError("counting FLOPs needs JAX's CPU backend: add cpu to JAX_PLATFORMS") from exc
    pinned = jax.tree_util.tree_map(lambda x: abstract_array(x.shape, x.dtype, cpu), args)
    cost = jax.jit(fn).lower(*pinned).cost_analysis()
    if isinstance(cost, list | tuple):  # older JAX releases answer one dict per computation
        cost = cost[0]
    if not cost or "flops" not in cost:
        raise RuntimeError(f"XLA gave no FLOP count for {getattr(fn, '__name__', fn)}")
    return float(cost["flops"])
