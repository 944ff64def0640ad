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

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import ml_dtypes
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


# Which layers the devices' bank holds factors for (worker/lora_bank.py), by rule over the parameter tree: every
# linear layer (a 2-D kernel) of the UNet's transformer blocks (under an `attentions_*` module: attention q/k/v/out,
# the feed-forward's two layers, proj_in and proj_out) and of both text encoders' transformer layers (q/k/v/out
# projections, fc1, fc2). Convolutions (LoCon) are not held: an adapter that changes one is refused by name.
_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def is_bank_target(target: Target, kernel_shape: tuple[int, ...]) -> bool:
    """Whether the layer at `target`, whose kernel has `kernel_shape`, is one the bank applies adapters to."""
    if len(kernel_shape) != 2:
        return False
    component, path = target[0], target[1:]
    if component == "unet":
        return any(part.startswith("attentions_") for part in path)
    return component in _TEXT_ENCODERS and "layers" in path


@dataclass(frozen=True)
class LoraConfig:
    """The devices' adapter pool: `slots` adapters resident at once, each padded to `max_rank`; a request names
    at most `max_loras` of them."""

    slots: int = 8
    max_rank: int = 64
    max_loras: int = 4

    def __post_init__(self) -> None:
        for name in ("slots", "max_rank", "max_loras"):
            if getattr(self, name) < 1:
                raise ValueError(f"LoRA {name} must be at least 1 (got {getattr(self, name)})")
        if self.max_loras > self.slots:
            raise ValueError(f"LoRA max_loras ({self.max_loras}) cannot exceed the pool's slots ({self.slots})")


# Reads an adapter by name (worker/lora_files.py from `--lora-dir`); raises LoraError (or any error) if it cannot.
LoadAdapter = Callable[[str], Adapter]


@dataclass(frozen=True)
class Padded:
    """An adapter as the bank's writer takes it: for every bank target, `down` [in, max_rank] and `up`
    [max_rank, out] in bfloat16, zero where the adapter has no update or a smaller rank."""

    name: str
    factors: Mapping[Target, tuple[np.ndarray, np.ndarray]]
    components: frozenset[str]


def pad(adapter: Adapter, targets: Mapping[Target, tuple[int, int]], max_rank: int) -> Padded:
    """`adapter` checked against the bank's targets (each target `(in, out)`) and zero-padded to `max_rank`.
    LoraError names the first update the bank cannot hold: a layer outside it, a shape that fits not, a rank
    over `max_rank`."""
    for target, factors in adapter.targets.items():
        _check(adapter.name, target, factors, targets, max_rank)
    padded: dict[Target, tuple[np.ndarray, np.ndarray]] = {}
    for target, (fan_in, fan_out) in targets.items():
        down = np.zeros((fan_in, max_rank), ml_dtypes.bfloat16)
        up = np.zeros((max_rank, fan_out), ml_dtypes.bfloat16)
        update = adapter.targets.get(target)
        if update is not None:
            down[:, : update.rank] = update.down
            up[: update.rank] = update.up
        padded[target] = (down, up)
    return Padded(adapter.name, padded, adapter.components())


def _check(
    name: str, target: Target, factors: Factors, targets: Mapping[Target, tuple[int, int]], max_rank: int
) -> None:
    where = "/".join(target)
    if target not in targets:
        kind = "a convolution (LoCon), which" if factors.down.ndim != 2 else "a layer"
        raise LoraError(f"adapter {name!r}: {where} is {kind} this worker does not apply adapters to")
    fan_in, fan_out = targets[target]
    if factors.down.shape != (fan_in, factors.rank) or factors.up.shape != (factors.rank, fan_out):
        raise LoraError(
            f"adapter {name!r}: {where} has down {factors.down.shape} and up {factors.up.shape}; the layer is "
            f"{fan_in} in, {fan_out} out"
        )
    if factors.rank > max_rank:
        raise LoraError(f"adapter {name!r}: {where} has rank {factors.rank}, over this worker's {max_rank}")
