"""The devices' bank of LoRA adapters, and how a traced model applies them per sample, unmerged.

The bank holds, for every target layer (worker/lora.py `is_bank_target`), `down` [slots, in, rank] and `up`
[slots, rank, out] in bfloat16, replicated on every device. One compiled writer puts an adapter into a slot (the
slot is an array input, so one executable writes every slot), and the executables that read the bank take it as
an input: adding an adapter compiles nothing.

`applied(factors, slot, scale)` is a Flax method interceptor (`flax.linen.intercept_methods`), active while a
model is traced inside it: each call of a target's `nn.Dense` gets `sum_k scale[b, k] * (x @ down[slot[b, k]]) @
up[slot[b, k]]` added for each sample b, its factors gathered from the bank (S-LoRA and Punica's gathered low-rank
update). The product is taken in the activations' dtype with float32 accumulation, and added in float32.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from worker.lora import COMPONENTS, LoraConfig, Padded, Target, is_bank_target
from worker.pipeline import _ALL, SDXLPipeline, Text, _Clock

# component -> the target's path joined by "/" -> {"down": [slots, in, rank], "up": [slots, rank, out]}
BankArrays = dict[str, dict[str, dict[str, jax.Array]]]


def targets_of(params: Mapping[str, Any]) -> dict[Target, tuple[int, int]]:
    """The bank's targets among a model's parameters, each with its kernel's `(in, out)`."""
    targets: dict[Target, tuple[int, int]] = {}
    for component in COMPONENTS:
        for path, leaf in jax.tree_util.tree_flatten_with_path(params[component])[0]:
            keys = tuple(str(getattr(key, "key", key)) for key in path)
            target = (component, *keys[:-1])
            if keys[-1] == "kernel" and is_bank_target(target, tuple(leaf.shape)):
                targets[target] = (int(leaf.shape[0]), int(leaf.shape[1]))
    return targets


class LoraBank:
    """The adapter slots on the devices of `pipeline`, zero until written; `compile` before `write`."""

    def __init__(self, pipeline: SDXLPipeline, config: LoraConfig) -> None:
        self.config = config
        self.targets = targets_of(pipeline._params)
        self._pipeline = pipeline
        slots, rank = config.slots, config.max_rank
        self.arrays: BankArrays = {component: {} for component in COMPONENTS}
        for target, (fan_in, fan_out) in self.targets.items():
            self.arrays[target[0]]["/".join(target[1:])] = {
                "down": pipeline._put(np.zeros((slots, fan_in, rank), jnp.bfloat16)),
                "up": pipeline._put(np.zeros((slots, rank, fan_out), jnp.bfloat16)),
            }
        self._writer: Any = None

    @property
    def nbytes(self) -> int:
        """Device memory the bank takes on each device."""
        return sum(int(array.nbytes) for array in jax.tree_util.tree_leaves(self.arrays))

    def compile(self, clock: _Clock) -> None:
        """Compile the writer (once) and run it once on slot 0, while the bank is still empty."""
        if self._writer is not None:
            return
        zeros = {
            component: {key: self._zero_row(pair) for key, pair in layers.items()}
            for component, layers in self.arrays.items()
        }
        self._writer = self._pipeline._compile(clock, _write, _ALL, self.arrays, self._slot(0), zeros, donate=(0,))
        self.arrays = self._writer(self.arrays, self._slot(0), zeros)

    def write(self, slot: int, adapter: Padded) -> None:
        """Put `adapter` into `slot` (every target: zeros where it has no update)."""
        new: BankArrays = {component: {} for component in COMPONENTS}
        for target, (down, up) in adapter.factors.items():
            new[target[0]]["/".join(target[1:])] = {"down": self._pipeline._put(down), "up": self._pipeline._put(up)}
        self.arrays = self._writer(self.arrays, self._slot(slot), new)

    def _slot(self, slot: int) -> jax.Array:
        return self._pipeline._put(np.int32(slot))

    def _zero_row(self, pair: dict[str, jax.Array]) -> dict[str, jax.Array]:
        return {name: self._pipeline._put(np.zeros(array.shape[1:], array.dtype)) for name, array in pair.items()}


def _write(arrays: BankArrays, slot: jax.Array, new: BankArrays) -> BankArrays:
    """One device's bank with `new` (each target's factors, one slot's worth) at `slot`."""
    written: BankArrays = jax.tree_util.tree_map(lambda pool, value: pool.at[slot].set(value), arrays, new)
    return written


@contextlib.contextmanager
def applied(factors: Mapping[str, dict[str, jax.Array]], slot: jax.Array, scale: jax.Array) -> Iterator[None]:
    """While open, each traced `nn.Dense` whose path is a key of `factors` (one component's bank) adds each
    sample's adapters: sample b's are the bank slots `slot[b]` [K] with scales `scale[b]` [K] (0: none)."""
    with nn.intercept_methods(functools.partial(_intercept, factors, slot, scale)):
        yield


def _intercept(
    factors: Mapping[str, dict[str, jax.Array]],
    slot: jax.Array,
    scale: jax.Array,
    next_fun: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    context: nn.module.InterceptorContext,
) -> Any:
    out = next_fun(*args, **kwargs)
    if context.method_name != "__call__" or not isinstance(context.module, nn.Dense):
        return out
    layer = factors.get("/".join(context.module.path))
    if layer is None:
        return out
    delta = low_rank(args[0], layer["down"][slot], layer["up"][slot], scale)
    return (out.astype(jnp.float32) + delta).astype(out.dtype)


def low_rank(x: jax.Array, down: jax.Array, up: jax.Array, scale: jax.Array) -> jax.Array:
    """`sum_k scale[b, k] * (x[b] @ down[b, k]) @ up[b, k]` in float32, per sample b: `x` [B, ..., in], `down`
    [B, K, in, R], `up` [B, K, R, out], `scale` [B, K]."""
    hidden = jnp.einsum("b...i,bkir->b...kr", x, down.astype(x.dtype), preferred_element_type=jnp.float32)
    weights = scale.reshape(scale.shape[0], *([1] * (x.ndim - 2)), scale.shape[1], 1)
    hidden = (hidden * weights).astype(x.dtype)
    product: jax.Array = jnp.einsum(
        "b...kr,bkro->b...o", hidden, up.astype(x.dtype), preferred_element_type=jnp.float32
    )
    return product


def lora_embeddings(
    pipe: Any, params: Mapping[str, Any], ids: jax.Array, bank: BankArrays, slot: jax.Array, scale: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """diffusers' `get_embeddings` (both encoders' penultimate hidden states, the second's pooled projection) with
    each encoder's adapters applied: `slot` and `scale` [batch, K]."""
    with applied(bank["text_encoder"], slot, scale):
        first = pipe.text_encoder(ids[:, 0, :], params=params["text_encoder"], output_hidden_states=True)
    with applied(bank["text_encoder_2"], slot, scale):
        second = pipe.text_encoder_2(ids[:, 1, :], params=params["text_encoder_2"], output_hidden_states=True)
    context = jnp.concatenate([first["hidden_states"][-2], second["hidden_states"][-2]], axis=-1)
    return context, second["text_embeds"]


def encode_with_loras(
    pipe: Any,
    params: Mapping[str, Any],
    ids: jax.Array,
    scale: jax.Array,
    bank: BankArrays,
    loras: Mapping[str, jax.Array],
) -> Text:
    """A prompt's text conditioning (batch 1) with a request's adapters (`loras`: "slot" and "scale" [K]), times
    `scale` (0: no negative prompt), as worker/pipeline.py `_encode_negative` makes it without."""
    context, pooled = lora_embeddings(pipe, params, ids, bank, loras["slot"][None], loras["scale"][None])
    return Text(context * scale.astype(context.dtype), pooled * scale.astype(pooled.dtype))
