"""The names LoRA files give a model's layers, resolved to the model's targets (worker/lora.py).

A target is a module path in a component's Flax parameter tree. The files people publish name the same layer
in one of three spellings, all of which come down to one string per layer once dots are underscores:

- diffusers' PyTorch names, as diffusers and PEFT write them (`unet.down_blocks.1.attentions.0.proj_in`):
  with dots as underscores they are the Flax path joined by underscores, since diffusers' Flax modules are
  PyTorch's `name.N` as `name_N` (`down_blocks_1`, `to_out_0`, `net_0`);
- kohya/A1111 names of a diffusers-named UNet (`lora_unet_down_blocks_1_attentions_0_proj_in`, as sd-scripts
  writes SD 1.x LoRAs and some SDXL tools write theirs), the same string;
- kohya/A1111 names of the original SGM/LDM UNet, which sd-scripts trains SDXL on
  (`lora_unet_input_blocks_4_1_proj_in`, `middle_block_1`, `output_blocks_2_0_in_layers_2`).

The text encoders are transformers' CLIP in every format (`lora_te1_text_model_encoder_layers_0_self_attn_q_proj`).
The LDM block numbers follow from the UNet's layers (how many resnets a level has, which up levels attend), read
here from the targets themselves, so any SDXL-architecture UNet resolves, the tiny one included.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from worker.lora import Target

# (component, the layer's name with underscores) -> target
NameTable = dict[tuple[str, str], Target]

_LDM_TOP = {
    ("conv_in",): "input_blocks_0_0",
    ("conv_out",): "out_2",
    ("time_embedding", "linear_1"): "time_embed_0",
    ("time_embedding", "linear_2"): "time_embed_2",
    ("add_embedding", "linear_1"): "label_emb_0_0",
    ("add_embedding", "linear_2"): "label_emb_0_2",
}
_LDM_RESNET = {
    "conv1": "in_layers_2",
    "conv2": "out_layers_3",
    "time_emb_proj": "emb_layers_1",
    "conv_shortcut": "skip_connection",
}
_LDM_MID = {"resnets_0": "middle_block_0", "attentions_0": "middle_block_1", "resnets_1": "middle_block_2"}
_LEVEL = re.compile(r"^(down|up)_blocks_(\d+)$")
_PART = re.compile(r"^(resnets|attentions|downsamplers|upsamplers)_(\d+)$")


def name_table(targets: Iterable[Target]) -> NameTable:
    """Every name a LoRA file may give each target, with dots as underscores, by component."""
    targets = list(targets)
    structure = _UnetStructure.of(targets)
    table: NameTable = {}
    for target in targets:
        component, path = target[0], target[1:]
        table[(component, "_".join(path))] = target
        ldm = structure.ldm_name(path) if component == "unet" else None
        if ldm is not None:
            table[(component, ldm)] = target
    return table


class _UnetStructure:
    """What the LDM numbering needs: resnets per down level, and which up levels have attentions."""

    def __init__(self, layers_per_block: int, attending_up_levels: frozenset[int]) -> None:
        self.stride = layers_per_block + 1  # each level's resnets, then its down/upsampler
        self.attending_up_levels = attending_up_levels

    @classmethod
    def of(cls, targets: Iterable[Target]) -> _UnetStructure:
        down_resnets: set[str] = set()
        attending: set[int] = set()
        for target in targets:
            if target[:2] == ("unet", "down_blocks_0") and target[2].startswith("resnets_"):
                down_resnets.add(target[2])
            level = _LEVEL.match(target[1]) if target[0] == "unet" and len(target) > 2 else None
            if level and level.group(1) == "up" and target[2].startswith("attentions_"):
                attending.add(int(level.group(2)))
        return cls(len(down_resnets), frozenset(attending))

    def ldm_name(self, path: tuple[str, ...]) -> str | None:
        """The original UNet's name of a diffusers UNet layer, with underscores; None if it has none."""
        if path in _LDM_TOP:
            return _LDM_TOP[path]
        prefix = self._block(path)
        if prefix is None:
            return None
        rest = path[2:]
        if path[1].startswith("resnets_") and rest:
            rest = (_LDM_RESNET.get(rest[0], rest[0]), *rest[1:])
        if path[1].endswith("samplers_0"):
            rest = rest[1:]  # the sampler's `conv` is in the prefix
        return "_".join((prefix, *rest))

    def _block(self, path: tuple[str, ...]) -> str | None:
        if len(path) < 2:
            return None
        if path[0] == "mid_block":
            return _LDM_MID.get(path[1])
        level, part = _LEVEL.match(path[0]), _PART.match(path[1])
        if level is None or part is None:
            return None
        i, kind, j = int(level.group(2)), part.group(1), int(part.group(2))
        if level.group(1) == "down":
            return self._input_block(i, kind, j)
        return self._output_block(i, kind, j)

    def _input_block(self, level: int, kind: str, j: int) -> str | None:
        if kind == "downsamplers":
            return f"input_blocks_{(level + 1) * self.stride}_0_op"
        inner = {"resnets": 0, "attentions": 1}.get(kind)
        return None if inner is None else f"input_blocks_{1 + level * self.stride + j}_{inner}"

    def _output_block(self, level: int, kind: str, j: int) -> str | None:
        if kind == "upsamplers":
            # After the level's last resnet and its attention, if the level attends.
            sampler = 2 if level in self.attending_up_levels else 1
            return f"output_blocks_{level * self.stride + self.stride - 1}_{sampler}_conv"
        inner = {"resnets": 0, "attentions": 1}.get(kind)
        return None if inner is None else f"output_blocks_{level * self.stride + j}_{inner}"


def lookup(table: Mapping[tuple[str, str], Target], component: str, dotted: str) -> Target | None:
    """The target a file's module name (dots or underscores) names in `component`, if any."""
    return table.get((component, dotted.replace(".", "_")))
