"""LoRA adapters, applied per row and unmerged: what an adapter is once loaded, whatever file it came from.

An adapter is a set of low-rank updates, each to one linear (or convolution) layer of the UNet or of a text
encoder: the layer's kernel `W` (Flax layout, `[in, out]`; a convolution's `[kh, kw, in, out]`) behaves as
`W + scale * down @ up`, where `down` is `[in, rank]` (a convolution's `[kh, kw, in, rank]`, its `up` a 1x1) and `up`
is `[rank, out]`, the file's `alpha / rank` already folded into `up`. The files people publish (kohya/A1111 and
diffusers/PEFT, worker/lora_files.py) are read into this one form.

The engine never merges an adapter into the base weights. The devices hold a pool of adapter slots (`LoraBank`),
each target's factors padded to the pool's rank; each row of a batch names up to `max_loras` slots with their
scales, and each layer adds `sum_k scale_k * (x @ down[slot_k]) @ up[slot_k]` for each sample from its own row's
slots (S-LoRA and Punica's gathered low-rank update). Slots and scales are inputs of the compiled step, so one
executable serves every adapter, scale and mix, and adding an adapter compiles nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

Component = Literal["unet", "text_encoder", "text_encoder_2"]
COMPONENTS: tuple[Component, ...] = ("unet", "text_encoder", "text_encoder_2")
# A target: the component, then the path of the layer's module in that component's Flax parameter tree (the
# module whose `kernel` the update adds to), for example ("unet", "down_blocks_1", "attentions_0",
# "transformer_blocks_0", "attn1", "to_q").
Target = tuple[str, ...]


class LoraError(Exception):
    """An adapter that cannot be used: a malformed file, a tensor that fits no layer, an unsupported layer. The
    message names the adapter and the tensor."""


@dataclass(frozen=True)
class Factors:
    """One layer's low-rank update: `W + scale * down @ up`, with the file's `alpha / rank` folded into `up`."""

    down: np.ndarray  # [in, rank], or a convolution's [kh, kw, in, rank]
    up: np.ndarray  # [rank, out]

    @property
    def rank(self) -> int:
        return int(self.down.shape[-1])

    @property
    def nbytes(self) -> int:
        return int(self.down.nbytes + self.up.nbytes)


@dataclass(frozen=True)
class Adapter:
    """A loaded adapter: its name (the file's, less the extension) and its updates by target."""

    name: str
    targets: Mapping[Target, Factors]

    @property
    def rank(self) -> int:
        """The largest rank among its updates."""
        return max((factors.rank for factors in self.targets.values()), default=0)

    @property
    def nbytes(self) -> int:
        return sum(factors.nbytes for factors in self.targets.values())

    def components(self) -> frozenset[str]:
        """The components it changes."""
        return frozenset(target[0] for target in self.targets)
