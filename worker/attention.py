"""Which computation the UNet's attention layers run: diffusers' own, or `jax.nn.dot_product_attention`.

`einsum` (the default) is diffusers' `FlaxAttention` as written: scores, softmax and the weighted sum as
three operations, in the model's dtype. `dot_product` computes the same attention with
`jax.nn.dot_product_attention`: cuDNN's fused flash attention on NVIDIA GPUs (the score matrix never
reaches memory), XLA's version of it elsewhere; both take the scores and softmax in float32.

The switch is a Flax method interceptor (`flax.linen.intercept_methods`), not a patched class: it acts
only while a function is traced inside `attention(...)`, only on the thread tracing it, and only on
`FlaxAttention.__call__` (the UNet's attention; the VAE's and the text encoders' are other classes). The
layer's own projections and weights are used unchanged, so both paths load the same checkpoints.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any, Literal, TypeVar, cast

import flax.linen as nn
import jax

from worker.config import ATTENTION, Attention
from worker.quiet import silence_flax_deprecation

silence_flax_deprecation()

from diffusers.models.attention_flax import FlaxAttention  # noqa: E402  (after the warning filter)

logger = logging.getLogger(__name__)

__all__ = ["ATTENTION", "DEFAULT_ATTENTION", "Attention", "attention", "implementation", "traced_with"]
DEFAULT_ATTENTION: Attention = "einsum"
Implementation = Literal["cudnn", "xla"]
F = TypeVar("F", bound=Callable[..., Any])


def implementation() -> Implementation:
    """cuDNN's flash attention where the local devices are CUDA GPUs, XLA's attention elsewhere."""
    device = jax.local_devices()[0]
    is_cuda = device.platform == "gpu" and "cuda" in device.client.platform_version.lower()
    return "cudnn" if is_cuda else "xla"


@contextlib.contextmanager
def attention(kind: Attention) -> Iterator[None]:
    """While this is open, `FlaxAttention` layers called on this thread compute with `kind`."""
    if kind not in ATTENTION:
        raise ValueError(f"unknown attention {kind!r}; one of {', '.join(ATTENTION)}")
    if kind == "einsum":
        yield
        return
    with nn.intercept_methods(functools.partial(_intercept, implementation())):
        yield


def traced_with(kind: Attention, fn: F) -> F:
    """`fn`, with its attention layers computed with `kind` whenever it is traced (by jit, pmap, ...)."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with attention(kind):
            return fn(*args, **kwargs)

    return cast(F, wrapped)


def _intercept(
    impl: Implementation,
    next_fun: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    context: nn.module.InterceptorContext,
) -> Any:
    if isinstance(context.module, FlaxAttention) and context.method_name == "__call__":
        return _dot_product(context.module, impl, *args, **kwargs)
    return next_fun(*args, **kwargs)


def _dot_product(
    layer: FlaxAttention,
    impl: Implementation,
    hidden_states: jax.Array,
    context: jax.Array | None = None,
    deterministic: bool = True,
) -> Any:
    """`FlaxAttention.__call__` with its projections, attention by `jax.nn.dot_product_attention`."""
    context = hidden_states if context is None else context
    batch = hidden_states.shape[0]

    def heads(x: jax.Array) -> jax.Array:  # [batch, tokens, heads, head channels]: the layout it takes
        return x.reshape(batch, -1, layer.heads, layer.dim_head)

    out = jax.nn.dot_product_attention(
        heads(layer.query(hidden_states)),
        heads(layer.key(context)),
        heads(layer.value(context)),
        scale=layer.scale,
        implementation=impl,
    )
    out = layer.proj_attn(out.reshape(batch, -1, layer.heads * layer.dim_head))
    return layer.dropout_layer(out, deterministic=deterministic)
