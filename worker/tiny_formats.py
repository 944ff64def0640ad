"""Write a Flax diffusers-layout model (the tiny model) again in the formats people publish.

- `write_diffusers_safetensors`: the same folder with PyTorch safetensors per component (PyTorch names
  and layouts: `[out, in]` linear weights, `[out, in, h, w]` convolutions), in a dtype, with a variant.
- `write_single_file`: one `*.safetensors` in the original LDM/SGM naming of AUTOMATIC1111 and ComfyUI
  checkpoints (OpenCLIP's packed attention and `x @ text_projection`; the VAE's attention as 1x1
  convolutions), with the buffers such files carry.

The mapping here is written from the original layout, not derived from the loader's: loading what these
write and getting the Flax parameters back tests the loader against an independent statement of the format.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax.traverse_util import flatten_dict

from worker.checkpoints import PYTORCH_STEMS, WEIGHTED
from worker.img2img import INPAINTING_IN_CHANNELS
from worker.quiet import silence_flax_deprecation

# Flax module names that diffusers made from PyTorch's `name.N` (others with digits, like linear_1, are not).
_NUMBERED = re.compile(
    r"^(down_blocks|up_blocks|resnets|attentions|downsamplers|upsamplers|transformer_blocks|net|to_out)_(\d+)$"
)
_FLAX_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def flax_params(model_dir: Path) -> dict[str, Any]:
    """The float32 parameters of a Flax diffusers-layout model, per weighted component."""
    silence_flax_deprecation()
    from diffusers import FlaxStableDiffusionXLPipeline

    _, params = FlaxStableDiffusionXLPipeline.from_pretrained(str(model_dir))
    return {name: params[name] for name in WEIGHTED}


def pytorch_state_dicts(params: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    """Each component's parameters under PyTorch names, in PyTorch layouts, float32."""
    return {
        name: dict(to_pytorch(key, np.asarray(value, np.float32), name) for key, value in flatten_dict(tree).items())  # type: ignore[no-untyped-call]
        for name, tree in params.items()
    }


def to_pytorch(key: tuple[str, ...], value: np.ndarray, component: str) -> tuple[str, np.ndarray]:
    """A Flax parameter's PyTorch name and value (kernels transposed to PyTorch's layouts)."""
    *path, leaf = key
    if component.startswith("text_encoder"):
        names = list(path)
    else:
        names = [_FLAX_ATTENTION.get(part, part) if i == len(path) - 1 else part for i, part in enumerate(path)]
        names = [_NUMBERED.sub(r"\1.\2", part) for part in names]
    if leaf == "kernel":
        value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
    return ".".join([*names, leaf]), value


def write_diffusers_safetensors(flax_dir: Path, out: Path, dtype: Any = np.float32, variant: str | None = None) -> Path:
    """`flax_dir` with each component's weights as PyTorch safetensors (`{stem}.{variant}.safetensors`)."""
    _copy_configs(flax_dir, out)
    tag = f".{variant}" if variant else ""
    for name, tensors in pytorch_state_dicts(flax_params(flax_dir)).items():
        cast = {key: value.astype(dtype) for key, value in tensors.items()}
        save_safetensors(cast, out / name / f"{PYTORCH_STEMS[name]}{tag}.safetensors")
    index = json.loads((out / "model_index.json").read_text())
    index["_class_name"] = pipeline_class(flax_dir)
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


def pipeline_class(flax_dir: Path) -> str:
    """diffusers' PyTorch pipeline class of the model, as published repositories name it in model_index.json: the
    inpainting pipeline for a 9-channel UNet."""
    unet = json.loads((flax_dir / "unet" / "config.json").read_text())
    return (
        "StableDiffusionXLInpaintPipeline"
        if unet["in_channels"] == INPAINTING_IN_CHANNELS
        else "StableDiffusionXLPipeline"
    )


def _copy_configs(flax_dir: Path, out: Path) -> None:
    shutil.copytree(flax_dir, out, ignore=shutil.ignore_patterns("*.msgpack"), dirs_exist_ok=True)


def write_single_file(flax_dir: Path, out: Path, dtype: Any = np.float16) -> Path:
    """The model as one safetensors file in the original SDXL naming."""
    silence_flax_deprecation()
    from diffusers import FlaxUNet2DConditionModel

    unet_config = FlaxUNet2DConditionModel.load_config(str(flax_dir / "unet"))
    pytorch = pytorch_state_dicts(flax_params(flax_dir))
    ldm = {
        **_prefixed("model.diffusion_model.", renamed(pytorch["unet"], unet_prefixes(unet_config))),
        **_prefixed("first_stage_model.", _vae_to_ldm(pytorch["vae"])),
        **_prefixed("conditioner.embedders.0.transformer.", pytorch["text_encoder"]),
        **_prefixed("conditioner.embedders.1.model.", _open_clip(pytorch["text_encoder_2"])),
    }
    # Buffers real checkpoints carry, which no Flax module has.
    positions = pytorch["text_encoder"]["text_model.embeddings.position_embedding.weight"].shape[0]
    ldm["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = np.arange(positions)[None]
    ldm["conditioner.embedders.1.model.logit_scale"] = np.array(4.6052, np.float32)
    floats = {k: v.astype(dtype) if v.dtype == np.float32 and v.ndim else v for k, v in ldm.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(floats, out)
    return out


def save_safetensors(tensors: Mapping[str, np.ndarray], path: Path, metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` as a safetensors file at `path`, with `metadata` in its header."""
    from safetensors.numpy import save_file

    # safetensors' numpy writer copies each array's memory as it lies: a transposed view must be made
    # contiguous first, or the file holds the untransposed bytes.
    contiguous = {key: np.ascontiguousarray(value) for key, value in tensors.items()}
    save_file(contiguous, str(path), dict(metadata) if metadata else None)


def _prefixed(prefix: str, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {prefix + key: value for key, value in tensors.items()}


def renamed(tensors: Mapping[str, np.ndarray], prefixes: Mapping[str, str]) -> dict[str, np.ndarray]:
    """Replace the longest matching diffusers prefix of each name by its original one."""
    out = {}
    for name, value in tensors.items():
        match = max((p for p in prefixes if name.startswith(p)), key=len, default=None)
        out[name if match is None else prefixes[match] + name[len(match) :]] = value
    return out


def unet_prefixes(config: Mapping[str, Any]) -> dict[str, str]:
    """diffusers UNet prefixes to the original `input_blocks`/`middle_block`/`output_blocks` ones."""
    per_level = config["layers_per_block"] + 1
    levels = len(config["block_out_channels"])
    prefixes = {f"{k}.": f"{v}." for k, v in _UNET_TOP.items()}
    for i in range(levels):
        for j in range(per_level - 1):
            block = 1 + i * per_level + j
            prefixes |= _resnet(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{block}.0.")
            prefixes[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{block}.1."
        prefixes[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(i + 1) * per_level}.0.op."
        has_attention = config["up_block_types"][i].startswith("CrossAttn")
        for j in range(per_level):
            prefixes |= _resnet(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{i * per_level + j}.0.")
            prefixes[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{i * per_level + j}.1."
        upsampler = f"output_blocks.{i * per_level + per_level - 1}.{2 if has_attention else 1}.conv."
        prefixes[f"up_blocks.{i}.upsamplers.0.conv."] = upsampler
    prefixes |= _resnet("mid_block.resnets.0.", "middle_block.0.") | _resnet("mid_block.resnets.1.", "middle_block.2.")
    prefixes["mid_block.attentions.0."] = "middle_block.1."
    return prefixes


def _resnet(diffusers: str, original: str) -> dict[str, str]:
    return {f"{diffusers}{k}.": f"{original}{v}." for k, v in _UNET_RESNET.items()}


def _vae_to_ldm(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    levels = 1 + max(int(m.group(1)) for k in tensors if (m := re.match(r"decoder\.up_blocks\.(\d+)", k)))
    prefixes: dict[str, str] = {}
    for side in ("encoder", "decoder"):
        prefixes |= {f"{side}.conv_norm_out.": f"{side}.norm_out."}
        for k in range(2):
            prefixes[f"{side}.mid_block.resnets.{k}."] = f"{side}.mid.block_{k + 1}."
        for part, original in _VAE_ATTENTION.items():
            prefixes[f"{side}.mid_block.attentions.0.{part}."] = f"{side}.mid.attn_1.{original}."
    for i in range(levels):
        prefixes[f"encoder.down_blocks.{i}.resnets."] = f"encoder.down.{i}.block."
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        prefixes[f"decoder.up_blocks.{i}.resnets."] = f"decoder.up.{levels - 1 - i}.block."
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{levels - 1 - i}.upsample."
    ldm = {k.replace("conv_shortcut", "nin_shortcut"): v for k, v in renamed(tensors, prefixes).items()}
    # The original attention's projections are 1x1 convolutions.
    return {k: v[:, :, None, None] if ".attn_1." in k and v.ndim == 2 else v for k, v in ldm.items()}


def _open_clip(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {_OPEN_CLIP[k]: v for k, v in tensors.items() if k in _OPEN_CLIP}
    out["text_projection"] = tensors["text_projection.weight"].T  # applied as x @ text_projection
    layers = {int(m.group(1)) for k in tensors if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))}
    for n in sorted(layers):
        hf, ldm = f"text_model.encoder.layers.{n}.", f"transformer.resblocks.{n}."
        for kind in ("weight", "bias"):
            packed = [tensors[f"{hf}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{ldm}attn.in_proj_{kind}"] = np.concatenate(packed)
        for part, original in _OPEN_CLIP_LAYER.items():
            for kind in ("weight", "bias"):
                out[f"{ldm}{original}.{kind}"] = tensors[f"{hf}{part}.{kind}"]
    return out


Writer = Callable[[Path, Path], Path]
