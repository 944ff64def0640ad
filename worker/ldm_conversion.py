"""Original (LDM/SGM) SDXL checkpoint names to diffusers' names, with diffusers' own conversion functions.

Single-file SDXL checkpoints, the ones AUTOMATIC1111 and ComfyUI load, keep the names of Stability's
original code: `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE),
`conditioner.embedders.0.transformer.*` (CLIP ViT-L, already in Hugging Face's layout) and
`conditioner.embedders.1.model.*` (OpenCLIP ViT-bigG, in OpenCLIP's layout).

diffusers maps these names in `diffusers.loaders.single_file_utils`, a module that imports torch at its
top for functions this project never calls; the functions used here only rename keys and slice arrays.
So the definitions named in `_DIFFUSERS_NAMES` are compiled from diffusers' installed source on their
own, without the module's imports: the mapping is diffusers', release for release, and no copy of it
lives here. OpenCLIP's attention, whose diffusers conversion calls torch methods, is split here.
"""

from __future__ import annotations

import ast
import functools
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from worker.safetensors_files import TensorRef

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

_DIFFUSERS_NAMES = (
    "CHECKPOINT_KEY_NAMES",
    "DIFFUSERS_TO_LDM_MAPPING",
    "LDM_VAE_KEYS",
    "LDM_UNET_KEY",
    "LDM_CLIP_PREFIX_TO_REMOVE",
    "conv_attn_to_linear",
    "update_unet_resnet_ldm_to_diffusers",
    "update_unet_attention_ldm_to_diffusers",
    "update_vae_resnet_ldm_to_diffusers",
    "update_vae_attentions_ldm_to_diffusers",
    "convert_ldm_unet_checkpoint",
    "convert_ldm_vae_checkpoint",
    "convert_ldm_clip_checkpoint",
    "infer_diffusers_model_type",
)


@functools.cache
def diffusers_definitions() -> Mapping[str, Any]:
    """The definitions of `_DIFFUSERS_NAMES`, compiled from diffusers' `single_file_utils.py` source."""
    import diffusers

    path = Path(diffusers.__file__).parent / "loaders" / "single_file_utils.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    body = [node for node in tree.body if _defined_names(node) & set(_DIFFUSERS_NAMES)]
    namespace: dict[str, Any] = {"logger": logging.getLogger("diffusers.loaders.single_file_utils")}
    # The installed diffusers package's own code, as an import of it would run it (ruff S102 guards against
    # exec of data read from Redis or the network; this is neither).
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), namespace)  # noqa: S102
    missing = [name for name in _DIFFUSERS_NAMES if name not in namespace]
    if missing:
        raise ImportError(f"diffusers {diffusers.__version__} has no {', '.join(missing)} in {path}")
    return namespace


def _defined_names(node: ast.stmt) -> set[str]:
    if isinstance(node, ast.FunctionDef | ast.ClassDef):
        return {node.name}
    if isinstance(node, ast.Assign):
        return {target.id for target in node.targets if isinstance(target, ast.Name)}
    return set()


def model_type(checkpoint: Mapping[str, TensorRef]) -> str:
    """diffusers' name for the kind of model a single-file checkpoint holds ("xl_base", "xl_refiner", "v1"...)."""
    return str(diffusers_definitions()["infer_diffusers_model_type"](checkpoint))


def unet_names(checkpoint: Mapping[str, TensorRef], unet_config: Mapping[str, Any]) -> dict[str, TensorRef]:
    """The UNet's tensors under diffusers' PyTorch names."""
    convert = diffusers_definitions()["convert_ldm_unet_checkpoint"]
    return dict(convert(dict(checkpoint), dict(unet_config)))


def vae_names(checkpoint: Mapping[str, TensorRef], vae_config: Mapping[str, Any]) -> dict[str, TensorRef]:
    """The VAE's tensors under diffusers' PyTorch names (its 1x1 attention convolutions as linear weights)."""
    convert = diffusers_definitions()["convert_ldm_vae_checkpoint"]
    only_vae = {name: ref for name, ref in checkpoint.items() if name.startswith(VAE_PREFIX)}
    return dict(convert(only_vae, dict(vae_config)))


def clip_l_names(checkpoint: Mapping[str, TensorRef]) -> dict[str, TensorRef]:
    """The first text encoder's tensors under transformers' CLIPTextModel names."""
    convert = diffusers_definitions()["convert_ldm_clip_checkpoint"]
    only_clip = {name: ref for name, ref in checkpoint.items() if name.startswith(CLIP_L_PREFIX)}
    return dict(convert(only_clip))


def open_clip_names(checkpoint: Mapping[str, TensorRef]) -> dict[str, TensorRef]:
    """The second text encoder's tensors under transformers' CLIPTextModelWithProjection names.

    OpenCLIP packs each layer's query, key and value projections into one `in_proj` (rows q, k, v, as
    PyTorch's MultiheadAttention does) and applies its text projection as `x @ text_projection`; the
    Hugging Face layout has three projections and a linear layer's [out, in] weight.
    """
    mapping = diffusers_definitions()["DIFFUSERS_TO_LDM_MAPPING"]["openclip"]
    converted: dict[str, TensorRef] = {}
    for hf_name, ldm_name in mapping["layers"].items():
        ref = checkpoint.get(OPEN_CLIP_PREFIX + ldm_name)
        if ref is not None:
            converted[hf_name] = ref.T if ldm_name == "text_projection" else ref
    layers = OPEN_CLIP_PREFIX + "transformer."
    for name, ref in checkpoint.items():
        if name.startswith(layers):
            converted.update(_open_clip_layer_tensor(name.removeprefix(layers), ref, mapping))
    return converted


def _open_clip_layer_tensor(name: str, ref: TensorRef, mapping: Mapping[str, Any]) -> dict[str, TensorRef]:
    for hf_part, ldm_part in mapping["transformer"].items():
        name = name.replace(ldm_part, hf_part)
    for packed, kind in ((".in_proj_weight", "weight"), (".in_proj_bias", "bias")):
        if name.endswith(packed):
            stem, width = name.removesuffix(packed), ref.shape[0] // 3
            return {f"{stem}.{part}_proj.{kind}": ref[i * width : (i + 1) * width] for i, part in enumerate("qkv")}
    return {name: ref}
