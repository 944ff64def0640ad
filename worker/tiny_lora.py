"""Write a small random LoRA for a Flax diffusers-layout model (the tiny model), as kohya, diffusers or PEFT files are.

The names come from each format's own convention by way of worker/tiny_formats.py, the statement the
single-file checkpoint writer uses: PyTorch names, and the original UNet's `input_blocks`/`middle_block`/
`output_blocks` prefixes for kohya's SDXL names. The reader resolves names with its own table
(worker/lora_names.py), so reading back what this writes, and getting its updates, tests the reader.

Where the alpha is stored is each writer's own: kohya's sd-scripts writes an `.alpha` tensor per layer (and
`ss_network_alpha` in the header; `kohya-metadata` writes only the header's); diffusers' `save_lora_weights` writes
PEFT's `LoraConfig` per component in the header's `lora_adapter_metadata`; PEFT's `save_pretrained` writes a folder
of `adapter_model.safetensors` (`base_model.model.<layer>` names, of the one model wrapped: a UNet, or a CLIP text
encoder) and `adapter_config.json`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from flax.traverse_util import flatten_dict

from worker.lora import COMPONENTS, Target
from worker.lora_scale import PEFT_CONFIG, PEFT_WEIGHTS
from worker.tiny_formats import renamed, save_safetensors, to_pytorch, unet_prefixes

Format = Literal["kohya", "kohya-metadata", "peft", "diffusers", "peft-folder"]
FORMATS: tuple[Format, ...] = ("kohya", "kohya-metadata", "peft", "diffusers", "peft-folder")

# The layers sd-scripts' LoRA trains by default: the UNet's transformers and the text encoders' attention and MLP.
_UNET_LINEAR = frozenset({"to_q", "to_k", "to_v", "to_out_0", "proj_in", "proj_out", "net_2", "proj"})
_TEXT_LINEAR = frozenset({"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"})
# LoCon's: the resnets' and the down/upsamplers' convolutions (and the resnets' time projections).
_UNET_CONV = frozenset({"conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv"})
_KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def write_tiny_lora(
    path: Path,
    params: Mapping[str, Any],
    rank: int,
    seed: int = 0,
    fmt: Format = "kohya",
    components: Sequence[str] = COMPONENTS,
    *,
    unet_config: Mapping[str, Any] | None = None,
    alpha: float | None = None,
    convolutions: bool = False,
    dtype: Any = np.float32,
) -> dict[Target, np.ndarray]:
    """Write a random rank-`rank` LoRA of `params`' layers to `path` (for `peft-folder`, a folder); return each
    target's update (Flax layout, `alpha / rank` applied: what the layer's kernel gains at scale 1).

    kohya names the UNet's layers in the original SGM/LDM naming when `unet_config` (the UNet's config.json) is
    given, as sd-scripts does for SDXL, and in diffusers' otherwise; it writes `alpha` (default: `rank`) per
    layer, or in the header only (`kohya-metadata`). `peft` writes an `.alpha` only when `alpha` is given;
    `diffusers` and `peft-folder` write it (default: `rank`) where their writers do, and `peft-folder` the first
    of `components` only (PEFT wraps one model). `convolutions`: LoCon updates of the UNet's resnets and samplers too.
    """
    rng = np.random.default_rng(seed)
    prefixes = unet_prefixes(unet_config) if unet_config is not None and fmt.startswith("kohya") else {}
    file_alpha = float(rank) if alpha is None and fmt != "peft" else alpha
    chosen = components[:1] if fmt == "peft-folder" else components
    tensors: dict[str, np.ndarray] = {}
    updates: dict[Target, np.ndarray] = {}
    for component in chosen:
        for layer, shape in _layers(params[component], component, convolutions):
            down, up = _random_factors(rng, shape, rank, dtype)
            module = _module_name(component, layer, prefixes)
            tensors |= _named(fmt, component, module, down, up, file_alpha if fmt in {"kohya", "peft"} else None)
            scale = 1.0 if file_alpha is None else file_alpha / rank
            updates[(component, *layer)] = _update(down, up) * np.float32(scale)
    _save(fmt, Path(path), tensors, _header(fmt, rank, file_alpha, chosen))
    return updates


def _header(fmt: Format, rank: int, alpha: float | None, components: Sequence[str]) -> dict[str, str]:
    """What the format's writer stores beside the tensors: its header's metadata, or (`peft-folder`) its config."""
    if fmt == "kohya-metadata":
        # sd-scripts' LoCon options: `--network_args conv_dim=N conv_alpha=A`, kept as JSON of the texts.
        conv = json.dumps({"conv_dim": f"{rank}", "conv_alpha": f"{alpha}"})
        return {"ss_network_alpha": f"{alpha}", "ss_network_dim": f"{rank}", "ss_network_args": conv}
    config: dict[str, Any] = {
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": False,
    }
    if fmt == "diffusers":
        fields = {f"{component}.{key}": value for component in components for key, value in config.items()}
        return {"format": "pt", "lora_adapter_metadata": json.dumps(fields, indent=2, sort_keys=True)}
    if fmt == "peft-folder":
        return {PEFT_CONFIG: json.dumps({"peft_type": "LORA", **config}, indent=2)}
    return {}


def _save(fmt: Format, path: Path, tensors: Mapping[str, np.ndarray], header: Mapping[str, str]) -> None:
    if fmt != "peft-folder":
        save_safetensors(tensors, path, header)
        return
    path.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, path / PEFT_WEIGHTS, {"format": "pt"})
    (path / PEFT_CONFIG).write_text(header[PEFT_CONFIG])


def _layers(tree: Any, component: str, convolutions: bool) -> Iterator[tuple[tuple[str, ...], tuple[int, ...]]]:
    chosen = _TEXT_LINEAR if component != "unet" else _UNET_LINEAR | (_UNET_CONV if convolutions else frozenset())
    for key, value in flatten_dict(tree).items():  # type: ignore[no-untyped-call]
        layer = tuple(map(str, key[:-1]))
        if key[-1] == "kernel" and layer[-1] in chosen and _is_trained(component, layer):
            yield layer, tuple(value.shape)


def _is_trained(component: str, layer: tuple[str, ...]) -> bool:
    if component != "unet":
        return True
    if layer[-1] == "proj":
        return layer[-2] == "net_0"  # the feed-forward's GEGLU projection
    if layer[-1] == "conv":
        return layer[-2] in {"downsamplers_0", "upsamplers_0"}
    return True


def _random_factors(rng: np.random.Generator, shape: tuple[int, ...], rank: int, dtype: Any) -> tuple[np.ndarray, ...]:
    """down `[rank, in]`, up `[out, rank]`, a convolution's `[rank, in, kh, kw]`, `[out, rank, 1, 1]`."""
    if len(shape) == 2:
        down, up = rng.standard_normal((rank, shape[0])), rng.standard_normal((shape[1], rank))
    else:
        down, up = (
            rng.standard_normal((rank, shape[2], shape[0], shape[1])),
            rng.standard_normal((shape[3], rank, 1, 1)),
        )
    return (0.1 * down).astype(dtype), (0.1 * up).astype(dtype)


def _update(down: np.ndarray, up: np.ndarray) -> np.ndarray:
    """`up @ down` in PyTorch's layout, then as a Flax kernel: `[in, out]`, a convolution's `[kh, kw, in, out]`."""
    down32, up32 = down.astype(np.float32), up.astype(np.float32)
    if down.ndim == 2:
        return (up32 @ down32).T
    update: np.ndarray = np.einsum("or,rihw->hwio", up32[:, :, 0, 0], down32)
    return update


def _module_name(component: str, layer: tuple[str, ...], prefixes: Mapping[str, str]) -> str:
    """The layer's PyTorch name, the UNet's in the original naming where `prefixes` are given."""
    weight, _ = to_pytorch((*layer, "kernel"), np.zeros((1, 1)), component)
    return next(iter(renamed({weight: np.zeros(())}, prefixes))).removesuffix(".weight")


def _named(
    fmt: Format, component: str, module: str, down: np.ndarray, up: np.ndarray, alpha: float | None
) -> dict[str, np.ndarray]:
    if fmt.startswith("kohya"):
        stem = _KOHYA_PREFIX[component] + module.replace(".", "_")
        parts = {"lora_down.weight": down, "lora_up.weight": up}
    else:
        stem = f"base_model.model.{module}" if fmt == "peft-folder" else f"{component}.{module}"
        parts = {"lora_A.weight": down, "lora_B.weight": up}
    if alpha is not None:
        parts["alpha"] = np.array(alpha, np.float32)
    return {f"{stem}.{part}": value for part, value in parts.items()}
