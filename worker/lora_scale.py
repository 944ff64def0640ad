"""The alpha of a LoRA file's layers that carry no `.alpha` tensor, from what the file's writer stored beside them.

A layer's update is `up @ down * alpha / rank` (PEFT's rsLoRA: `alpha / sqrt(rank)`); an `.alpha` tensor beside the
factors wins. Otherwise, in the order tried:

- PEFT's `save_pretrained` folder: `adapter_config.json` beside `adapter_model.safetensors`, with `lora_alpha`,
  `alpha_pattern` (module-name patterns to alphas, matched as PEFT's `get_pattern_key` does: the pattern ends the
  module's dotted name) and `use_rslora`;
- diffusers' `save_lora_weights`: the same PEFT `LoraConfig` fields per component in the header's
  `lora_adapter_metadata` (JSON), each key prefixed by its component (`unet.lora_alpha`, `text_encoder.r`);
- kohya's sd-scripts: the header's `ss_network_alpha` (a number as text), for every layer but LoCon's 3x3
  convolutions, which take the `conv_alpha` of its `ss_network_args` (JSON of text values) where it gives one;
- nothing: alpha is the rank (scale 1), as kohya and diffusers read such files.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from worker.lora import COMPONENTS, LoraError

# The two files of PEFT's `save_pretrained` folder.
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
# The file diffusers' `save_lora_weights` (and its training scripts) write in a folder: the alpha is in its header.
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers.loaders.lora_base.LORA_WEIGHT_NAME_SAFE
DIFFUSERS_METADATA = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
KOHYA_ALPHA, KOHYA_ARGS = "ss_network_alpha", "ss_network_args"
PEFT_DEFAULT_ALPHA = 8.0  # peft.LoraConfig's `lora_alpha` when a config names none


@dataclass(frozen=True)
class Scaling:
    """How one component's layers without an `.alpha` tensor are scaled."""

    alpha: float | None = None  # None: the rank's own (scale 1)
    patterns: tuple[tuple[re.Pattern[str], float], ...] = ()  # PEFT's alpha_pattern, in its order
    rslora: bool = False
    conv_alpha: float | None = None  # kohya's LoCon: a 3x3 convolution's, where it differs

    def scale(self, layer: str, rank: int, alpha: float | None, spatial: bool = False) -> float:
        """The factor on `up @ down` for `layer` (the file's dotted module name) of rank `rank`; `alpha` is the
        layer's own `.alpha` tensor, if any; `spatial`: the layer is a convolution of a kernel larger than 1x1."""
        if alpha is None and spatial and self.conv_alpha is not None:
            alpha = self.conv_alpha
        if alpha is None:
            alpha = next((value for pattern, value in self.patterns if pattern.match(layer)), self.alpha)
        if alpha is None:
            return 1.0
        return alpha / (math.sqrt(rank) if self.rslora else rank)


def scalings(name: str, data: bytes, config: bytes | None) -> dict[str, Scaling]:
    """Each component's `Scaling` for adapter `name`: its safetensors bytes `data` (already checked) and, for a PEFT
    folder, its `adapter_config.json`. Raises `LoraError` naming the file and the key of a value it cannot use."""
    if config is not None:
        where = PEFT_CONFIG
        return dict.fromkeys(COMPONENTS, _peft(name, where, _json_object(name, where, config)))
    metadata = header_metadata(data)
    if DIFFUSERS_METADATA in metadata:
        where = f"the header's {DIFFUSERS_METADATA!r}"
        fields = _json_object(name, where, metadata[DIFFUSERS_METADATA].encode())
        return {component: _peft(name, where, _of(component, fields), component) for component in COMPONENTS}
    if KOHYA_ALPHA in metadata:
        alpha = _number(name, f"the header's {KOHYA_ALPHA!r}", _text_number(metadata[KOHYA_ALPHA]))
        return dict.fromkeys(COMPONENTS, Scaling(alpha, conv_alpha=_kohya_conv_alpha(name, metadata)))
    return {}


def _kohya_conv_alpha(name: str, metadata: Mapping[str, str]) -> float | None:
    """`conv_alpha` of sd-scripts' `ss_network_args` (`--network_args conv_dim=8 conv_alpha=4`, as JSON of the
    texts); the field holds other options too, so one that is not a JSON object gives none."""
    try:
        args = json.loads(metadata.get(KOHYA_ARGS, "{}"))
    except json.JSONDecodeError:
        return None
    if not isinstance(args, dict) or args.get("conv_alpha") is None:
        return None
    where = f"the header's {KOHYA_ARGS!r}"
    return _number(name, where, _text_number(str(args["conv_alpha"])), "conv_alpha")


def header_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's header: the format is an 8-byte little-endian length, then that
    much JSON (safetensors' Python API reads it only from a file on disk)."""
    (length,) = struct.unpack("<Q", data[:8])
    metadata = json.loads(data[8 : 8 + length]).get("__metadata__") or {}
    return {str(key): str(value) for key, value in metadata.items()}


def _of(component: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    prefix = f"{component}."
    return {key.removeprefix(prefix): value for key, value in fields.items() if key.startswith(prefix)}


def _peft(name: str, where: str, fields: Mapping[str, Any], component: str = "") -> Scaling:
    """A PEFT `LoraConfig`'s scaling: `lora_alpha` (PEFT's default where a config names none), `alpha_pattern`,
    `use_rslora` (`r` and `rank_pattern` are the tensors' own ranks). No fields (diffusers' metadata for another
    component): scale 1, as diffusers reads a component without its config."""
    if not fields:
        return Scaling()
    key = f"{component}." if component else ""
    alpha = fields.get("lora_alpha", PEFT_DEFAULT_ALPHA)
    patterns = fields.get("alpha_pattern") or {}
    if not isinstance(patterns, dict):
        raise _error(name, where, f"{key}alpha_pattern", f"is {patterns!r}; it maps module names to alphas")
    return Scaling(
        None if alpha is None else _number(name, where, alpha, f"{key}lora_alpha"),
        tuple(_pattern(name, where, f"{key}alpha_pattern", pattern, value) for pattern, value in patterns.items()),
        fields.get("use_rslora") is True,
    )


def _pattern(name: str, where: str, key: str, pattern: str, value: Any) -> tuple[re.Pattern[str], float]:
    try:
        compiled = re.compile(rf"(.*\.)?({pattern})$")
    except re.error as exc:
        raise _error(name, where, f"{key}[{pattern!r}]", f"is not a pattern ({exc})") from None
    return compiled, _number(name, where, value, f"{key}[{pattern!r}]")


def _json_object(name: str, where: str, raw: bytes) -> dict[str, Any]:
    try:
        fields = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoraError(f"LoRA {name!r}: {where} is not JSON ({exc})") from None
    if not isinstance(fields, dict):
        raise LoraError(f"LoRA {name!r}: {where} is not a JSON object")
    return fields


def _text_number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def _number(name: str, where: str, value: Any, key: str = "") -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        if key:
            raise _error(name, where, key, f"is {value!r}; an alpha is a finite number")
        raise LoraError(f"LoRA {name!r}: {where} is {value!r}; an alpha is a finite number")
    return float(value)


def _error(name: str, where: str, key: str, what: str) -> LoraError:
    return LoraError(f"LoRA {name!r}: {where}: {key!r} {what}")
