"""Read the LoRA files people publish into an `Adapter` (worker/lora.py), or refuse them with a `LoraError`.

Two families of safetensors files, in PyTorch layouts (a linear layer's `lora_down` is `[rank, in]` and its
`lora_up` `[out, rank]`; a convolution's down `[rank, in, kh, kw]` and up `[out, rank, 1, 1]`):

- kohya/A1111 (sd-scripts, LyCORIS's LoCon): `lora_unet_<layer>.lora_down.weight`, `.lora_up.weight` and
  `.alpha`; `lora_te1_*` and `lora_te2_*` for the two text encoders;
- diffusers/PEFT: `unet.<layer>.lora_A.weight` and `.lora_B.weight` (diffusers' `.lora.down.weight` /
  `.lora_linear_layer.down.weight` and its older attention-processor `to_q_lora.down.weight` too), under
  `text_encoder.` and `text_encoder_2.` for the text encoders, with an optional `.alpha` per layer; PEFT's own
  `save_pretrained` names a model's layers `base_model.model.<layer>`: a UNet's, or a CLIP text encoder's
  (`base_model.model.text_model.*`, `text_projection`). Either of SDXL's text encoders may be such a model, so a
  text encoder's file is read as the one whose layers and kernel shapes all its tensors fit, and refused where both
  (or neither) fit.

Layer names resolve to the model's targets in worker/lora_names.py. Each update's `alpha / rank` is folded into
`up`: the layer's `.alpha` tensor, else what the writer stored beside the tensors (a PEFT folder's
`adapter_config.json`, diffusers' `lora_adapter_metadata`, kohya's `ss_network_alpha`: worker/lora_scale.py), else
1. The factors are float32 in Flax layouts. Only plain LoRA is read: LoHa, LoKr, DoRA, Tucker-core LoCon and
full-weight differences are refused by name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import ml_dtypes
import numpy as np
from flax.traverse_util import flatten_dict
from safetensors import SafetensorError, deserialize

from worker.lora import COMPONENTS, Adapter, Factors, LoraError, Target
from worker.lora_names import NameTable, lookup, name_table
from worker.lora_scale import Scaling, scalings

Role = Literal["down", "up", "alpha"]

_FLOATS: dict[str, Any] = {"F16": np.float16, "BF16": ml_dtypes.bfloat16, "F32": np.float32, "F64": np.float64}
_INTEGERS: dict[str, Any] = {f"{k}{n}": np.dtype(f"{k.lower()}{n // 8}") for k in "IU" for n in (8, 16, 32, 64)}
_KOHYA = re.compile(r"^lora_(unet|te1|te2|te)_([^.]+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
# `lora_te_`: SD 1.x's one text encoder, the same CLIP ViT-L as SDXL's first (diffusers reads it so too).
_KOHYA_COMPONENTS = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2", "te": "text_encoder"}
_PEFT_PREFIX = "base_model.model."
# PEFT's name of a CLIP text model's layers (`CLIPTextModel`, and `CLIPTextModelWithProjection`'s projection).
_PEFT_TEXT = re.compile(r"^base_model\.model\.(text_model\.|text_projection\.)")
_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
_EITHER_TEXT_ENCODER = "text encoder"  # a `_Key`'s component until the file's tensors tell which
_PREFIXED = re.compile(r"^(unet|text_encoder_2|text_encoder)\.(.+)$")
_DIFFUSERS = re.compile(
    r"^(.+?)\.(lora_A\.weight|lora_B\.weight|(?:lora|lora_linear_layer)\.(?:down|up)\.weight|alpha)$"
)
# diffusers' attention-processor files: `attn1.processor.to_q_lora.down.weight` is `attn1.to_q`'s down.
_PROCESSOR = re.compile(r"^(.+?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_PROCESSOR_LAYERS = {
    "unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    "text": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
}
_ROLES: dict[str, Role] = {
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "lora_A.weight": "down",
    "lora_B.weight": "up",
    "lora.down.weight": "down",
    "lora.up.weight": "up",
    "lora_linear_layer.down.weight": "down",
    "lora_linear_layer.up.weight": "up",
    "alpha": "alpha",
}
_UNSUPPORTED = (
    (re.compile(r"hada_"), "LoHa (LyCORIS `hada_` tensors)"),
    (re.compile(r"lokr_"), "LoKr (LyCORIS `lokr_` tensors)"),
    (re.compile(r"dora_scale|lora_magnitude_vector"), "DoRA (a weight-decomposed LoRA's magnitude)"),
    (re.compile(r"lora_mid"), "LoCon with a Tucker core (`lora_mid`)"),
    (re.compile(r"\.diff(_b)?$"), "a full-weight difference (`diff`)"),
    (re.compile(r"\.bias$"), "an update of a layer's bias"),
)


@dataclass(frozen=True)
class _Tensor:
    dtype: str  # safetensors' spelling: F16, BF16, F32, I64...
    array: np.ndarray


@dataclass(frozen=True)
class _Key:
    component: str
    layer: str  # as the file spells it
    role: Role


@dataclass(frozen=True)
class _Layer:
    component: str
    layer: str  # as the file's first key of it spells it (PEFT's alpha_pattern matches this)
    roles: dict[Role, str]  # the keys


def layer_shapes(params: Mapping[str, Any]) -> dict[Target, tuple[int, ...]]:
    """Every target of a model, with its Flax kernel's shape, from `{"unet": ..., "text_encoder": ...,
    "text_encoder_2": ...}` parameter trees (other components are ignored): each module with a `kernel`."""
    shapes: dict[Target, tuple[int, ...]] = {}
    for component in COMPONENTS:
        if component not in params:
            continue
        for path, leaf in flatten_dict(params[component]).items():  # type: ignore[no-untyped-call]
            if path[-1] == "kernel":
                shapes[(component, *map(str, path[:-1]))] = tuple(int(n) for n in leaf.shape)
    return shapes


def read_adapter(
    name: str, data: bytes, layers: Mapping[Target, tuple[int, ...]], config: bytes | None = None
) -> Adapter:
    """The adapter a LoRA safetensors file holds, for a model whose targets and kernel shapes are `layers`
    (`layer_shapes`); `config` is a PEFT folder's `adapter_config.json` beside the file. Raises `LoraError`, naming
    the adapter and the tensor (or the file and key of a config value), for anything it cannot use."""
    tensors = _load(name, data)
    scaling = scalings(name, data, config)
    grouped = _group(name, tensors, name_table(layers), layers)
    return Adapter(
        name,
        {
            target: _factors(name, layer, tensors, layers[target], scaling.get(layer.component, Scaling()))
            for target, layer in grouped.items()
        },
    )


def _error(name: str, key: str, what: str) -> LoraError:
    return LoraError(f"LoRA {name!r}: tensor {key!r} {what}")


def _load(name: str, data: bytes) -> dict[str, _Tensor]:
    # safetensors' own parser (it checks the header against the bytes), as `safetensors.numpy.load` uses it:
    # that function's dtype table has no BF16, a common LoRA dtype, so the arrays are made here, with
    # ml_dtypes' bfloat16.
    try:
        views: list[tuple[str, dict[str, Any]]] = deserialize(data)  # type: ignore[no-untyped-call]
    except SafetensorError as exc:
        raise LoraError(f"LoRA {name!r}: not a safetensors file ({exc})") from None
    if not views:
        raise LoraError(f"LoRA {name!r}: the file holds no tensors")
    return {key: _tensor(name, key, view) for key, view in views}


def _tensor(name: str, key: str, view: Mapping[str, Any]) -> _Tensor:
    dtype = view["dtype"]
    numpy_dtype = _FLOATS.get(dtype, _INTEGERS.get(dtype))
    if numpy_dtype is None:
        raise _error(name, key, f"is {dtype}; LoRA tensors are floats (F16, BF16, F32)")
    return _Tensor(dtype, np.frombuffer(view["data"], numpy_dtype).reshape(view["shape"]))


def _group(
    name: str, tensors: Mapping[str, _Tensor], table: NameTable, layers: Mapping[Target, tuple[int, ...]]
) -> dict[Target, _Layer]:
    """Each target's tensors by role (the keys), every key resolved to a layer of the model."""
    keys = _text_encoder_of(name, {key: _parse_key(name, key) for key in tensors}, tensors, table, layers)
    grouped: dict[Target, _Layer] = {}
    for key, parsed in keys.items():
        target = lookup(table, parsed.component, parsed.layer)
        if target is None:
            raise _error(name, key, f"names no layer of this model's {parsed.component} ({parsed.layer!r})")
        roles = grouped.setdefault(target, _Layer(parsed.component, parsed.layer, {})).roles
        if parsed.role in roles:
            raise _error(
                name, key, f"is a second {parsed.role} of layer {'.'.join(target)} (after {roles[parsed.role]!r})"
            )
        roles[parsed.role] = key
    return grouped


def _text_encoder_of(
    name: str,
    keys: Mapping[str, _Key],
    tensors: Mapping[str, _Tensor],
    table: NameTable,
    layers: Mapping[Target, tuple[int, ...]],
) -> dict[str, _Key]:
    """`keys` with PEFT's text-model layers given their encoder: the one of the model's two whose layers and kernel
    shapes every such tensor fits. A LoraError where both fit (the same architecture, as in the tiny model) or
    neither: which encoder the file was trained on is then unknown, and reading it as either would be a guess."""
    # Sorted: a refusal names the same tensor every time (safetensors' own order is not fixed).
    text = sorted(key for key, parsed in keys.items() if parsed.component == _EITHER_TEXT_ENCODER)
    if not text:
        return dict(keys)
    fitting = [
        encoder
        for encoder in _TEXT_ENCODERS
        if all(_fits(tensors[key], keys[key], lookup(table, encoder, keys[key].layer), layers) for key in text)
    ]
    if len(fitting) != 1:
        raise _error(
            name,
            text[0],
            f"is PEFT's name of a CLIP text encoder's layer (`base_model.model.text_model.*`), and the file's "
            f"layers and shapes fit {'both' if fitting else 'neither'} of this model's text encoders "
            f"({', '.join(_TEXT_ENCODERS)}): a text encoder's PEFT file is read only where they tell which; save it "
            "with diffusers' `text_encoder.`/`text_encoder_2.` names (`save_lora_weights`)",
        )
    return {
        key: replace(parsed, component=fitting[0]) if parsed.component == _EITHER_TEXT_ENCODER else parsed
        for key, parsed in keys.items()
    }


def _fits(tensor: _Tensor, key: _Key, target: Target | None, layers: Mapping[Target, tuple[int, ...]]) -> bool:
    """Whether a linear layer's tensor `key` could be the LoRA of `target` (a text encoder's layers are linear)."""
    if target is None:
        return False
    kernel, shape = layers[target], tensor.array.shape
    if key.role == "down":
        return len(shape) == 2 and shape[1] == kernel[0]
    if key.role == "up":
        return len(shape) == 2 and shape[0] == kernel[-1]
    return True


def _parse_key(name: str, key: str) -> _Key:
    for pattern, kind in _UNSUPPORTED:
        if pattern.search(key):
            raise _error(name, key, f"is {kind}, which is not supported: plain LoRA (down and up) only")
    parsed = _kohya_key(key) if key.startswith("lora_") else _diffusers_key(key)
    if parsed is None:
        raise _error(
            name,
            key,
            "is not a LoRA tensor: expected kohya's `lora_unet_*/lora_te1_*/lora_te2_*` with `.lora_down.weight`, "
            "`.lora_up.weight`, `.alpha`, or diffusers/PEFT's `unet./text_encoder./text_encoder_2.` with "
            "`.lora_A.weight`, `.lora_B.weight`, `.alpha`",
        )
    return parsed


def _kohya_key(key: str) -> _Key | None:
    match = _KOHYA.match(key)
    if match is None:
        return None
    return _Key(_KOHYA_COMPONENTS[match.group(1)], match.group(2), _ROLES[match.group(3)])


def _diffusers_key(key: str) -> _Key | None:
    # PEFT's `save_pretrained` of a model wrapped by `get_peft_model`: `base_model.model.<layer>`, a UNet's or a
    # CLIP text model's, which of the two text encoders to be told by the whole file (`_text_encoder_of`).
    unprefixed = key.removeprefix(_PEFT_PREFIX)
    prefixed = _PREFIXED.match(unprefixed)
    if _PEFT_TEXT.match(key):
        component, rest = _EITHER_TEXT_ENCODER, unprefixed
    elif prefixed:
        component, rest = prefixed.group(1), prefixed.group(2)
    else:  # diffusers' first SDXL-era files named the UNet's layers with no prefix, as PEFT's do after its own
        component, rest = "unet", unprefixed
    processor = _PROCESSOR.match(rest)
    if processor is not None:
        layers = _PROCESSOR_LAYERS["unet" if component == "unet" else "text"]
        return _Key(
            component, f"{processor.group(1)}.{layers[processor.group(2)]}", _ROLES[f"lora.{processor.group(3)}.weight"]
        )
    match = _DIFFUSERS.match(rest)
    return None if match is None else _Key(component, match.group(1), _ROLES[match.group(2)])


def _factors(
    name: str, layer: _Layer, tensors: Mapping[str, _Tensor], shape: tuple[int, ...], scaling: Scaling
) -> Factors:
    roles = layer.roles
    down_key, up_key = roles.get("down"), roles.get("up")
    if down_key is None:
        raise _error(name, up_key or roles["alpha"], "has no down (`lora_down` / `lora_A`) beside it")
    if up_key is None:
        raise _error(name, down_key, "has no up (`lora_up` / `lora_B`) beside it")
    down = _flax_down(name, down_key, _floats(name, down_key, tensors[down_key]), shape)
    up = _flax_up(name, up_key, _floats(name, up_key, tensors[up_key]), shape)
    rank = down.shape[-1]
    if up.shape[0] != rank:
        raise _error(name, up_key, f"has rank {up.shape[0]}, but its down {down_key!r} has rank {rank}")
    alpha_key = roles.get("alpha")
    alpha = None if alpha_key is None else _alpha(name, alpha_key, tensors[alpha_key])
    scale = scaling.scale(layer.layer, rank, alpha, spatial=len(shape) == 4 and shape[:2] != (1, 1))
    return Factors(np.ascontiguousarray(down), np.ascontiguousarray(up * np.float32(scale)))


def _floats(name: str, key: str, tensor: _Tensor) -> np.ndarray:
    if tensor.dtype not in _FLOATS:
        raise _error(name, key, f"is {tensor.dtype}; LoRA factors are floats (F16, BF16, F32)")
    array = tensor.array.astype(np.float32)
    if not np.isfinite(array).all():
        raise _error(name, key, "holds NaN or infinite values")
    return array


def _alpha(name: str, key: str, tensor: _Tensor) -> float:
    if tensor.array.size != 1:
        raise _error(name, key, f"has shape {list(tensor.array.shape)}; an alpha is one number")
    value = float(tensor.array.astype(np.float64).reshape(()))
    if not np.isfinite(value):
        raise _error(name, key, "is NaN or infinite")
    return value


def _flax_down(name: str, key: str, down: np.ndarray, kernel: tuple[int, ...]) -> np.ndarray:
    """PyTorch's `[rank, in]` (a convolution's `[rank, in, kh, kw]`) as Flax's `[in, rank]` (`[kh, kw, in, rank]`)."""
    if len(kernel) == 4:
        return _conv_down(name, key, down, kernel)
    if down.ndim == 4 and down.shape[2:] == (1, 1):
        down = down[:, :, 0, 0]  # a 1x1 convolution's LoRA on what the model has as a linear layer
    if down.ndim == 4:
        raise _error(name, key, f"is a {down.shape[2]}x{down.shape[3]} convolution's down, but its layer is linear")
    if down.ndim != 2 or down.shape[1] != kernel[0] or down.shape[0] == 0:
        raise _error(
            name, key, f"has shape {list(down.shape)}; its linear layer ({kernel[0]} in) takes [rank, {kernel[0]}]"
        )
    return down.T


def _conv_down(name: str, key: str, down: np.ndarray, kernel: tuple[int, ...]) -> np.ndarray:
    height, width, channels = kernel[:3]
    if down.ndim == 2 and (height, width) == (1, 1):
        down = down[:, :, None, None]  # a linear LoRA on what the model has as a 1x1 convolution
    if down.ndim != 4 or down.shape[1:] != (channels, height, width) or down.shape[0] == 0:
        want = f"[rank, {channels}, {height}, {width}]"
        raise _error(name, key, f"has shape {list(down.shape)}; its {height}x{width} convolution takes {want}")
    return down.transpose(2, 3, 1, 0)


def _flax_up(name: str, key: str, up: np.ndarray, kernel: tuple[int, ...]) -> np.ndarray:
    """PyTorch's `[out, rank]` (a convolution's `[out, rank, 1, 1]`) as Flax's `[rank, out]`."""
    if up.ndim == 4 and up.shape[2:] == (1, 1):
        up = up[:, :, 0, 0]
    if up.ndim != 2 or up.shape[0] != kernel[-1]:
        want = f"[{kernel[-1]}, rank] (a convolution's [{kernel[-1]}, rank, 1, 1])"
        raise _error(name, key, f"has shape {list(up.shape)}; its layer ({kernel[-1]} out) takes {want}")
    return up.T
