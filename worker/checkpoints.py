"""Load SDXL from the formats people publish, with no torch and no pickle: host parameters in bfloat16.

`--model` names one of:
- a diffusers-layout folder or hub repository with Flax weights (`*/diffusion_flax_model.msgpack`);
- a diffusers-layout folder or hub repository with PyTorch safetensors per component (fp32, fp16 or bf16;
  a `variant` such as `diffusion_pytorch_model.fp16.safetensors`, or sharded with an index);
- a single-file SDXL checkpoint (`*.safetensors` in the original LDM/SGM naming that AUTOMATIC1111 and
  ComfyUI load). It holds weights only: the component configurations and tokenizers come from
  `model_config`, a diffusers-layout folder or hub repository (SDXL base's by default, weights not fetched).

SDXL inpainting models (a UNet of 9 input channels: latents, mask, masked-image latents) load from each format: a
folder names diffusers' inpainting pipeline and its UNet config says 9; a single file's UNet takes the channels its
first convolution has, whatever `model_config` says (worker/inpainting_model.py tells the pipeline's kind).

PyTorch names and layouts become the Flax parameter trees of diffusers' and transformers' Flax modules
through their own renaming functions; original names become diffusers' through diffusers' own single-file
conversion (worker/ldm_conversion.py). Every tensor is read, converted and cast one at a time, and checked
against the parameter tree the architecture expects: another architecture, a truncated file, a missing
tensor or a wrong shape is a `CheckpointError` naming it, at load.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from worker import ldm_conversion
from worker.img2img import INPAINTING_IN_CHANNELS, LATENT_CHANNELS
from worker.quiet import silence_flax_deprecation
from worker.safetensors_files import SafetensorsFile, TensorRef, UnreadableFile

silence_flax_deprecation()

from diffusers import FlaxStableDiffusionXLPipeline  # noqa: E402  (after the warning filter)

logger = logging.getLogger(__name__)

WEIGHTED = ("text_encoder", "text_encoder_2", "unet", "vae")
DEFAULT_CONFIG_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
# Per component, the stem of diffusers' PyTorch weights file (transformers' for the text encoders).
PYTORCH_STEMS = {
    "text_encoder": "model",
    "text_encoder_2": "model",
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
}
FLAX_FILES = {
    "text_encoder": "flax_model.msgpack",
    "text_encoder_2": "flax_model.msgpack",
    "unet": "diffusion_flax_model.msgpack",
    "vae": "diffusion_flax_model.msgpack",
}
# Which PyTorch files of a component to read when there is a choice: the fp16 variant first (half the bytes
# to fetch and read, and serving is in bfloat16 anyway), then the plain files, then bf16.
VARIANTS: tuple[str | None, ...] = ("fp16", None, "bf16")
# Everything of a diffusers-layout repository except weights.
CONFIG_PATTERNS = ("model_index.json", "*/config.json", "scheduler/*", "tokenizer/*", "tokenizer_2/*")
PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin", ".pkl"})
# SDXL inpainting releases (a 9-channel UNet) name diffusers' inpainting pipeline; their other parts are SDXL base's.
SDXL_PIPELINES = frozenset(
    {"StableDiffusionXLPipeline", "FlaxStableDiffusionXLPipeline", "StableDiffusionXLInpaintPipeline"}
)
# A UNet's input channels: SDXL base's latents, or an inpainting UNet's latents, mask and masked-image latents.
UNET_IN_CHANNELS = frozenset({LATENT_CHANNELS, INPAINTING_IN_CHANNELS})
# The tensor whose input channels say which (the UNet's first convolution, [out, in, 3, 3]).
UNET_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
# What diffusers' detection names a single file of SDXL's layout too small to have OpenCLIP's tenth block (the
# tiny model): accepted when every SDXL part is there, as SD 1.x files lack the second text encoder.
SMALL_SDXL_LOOKALIKES = frozenset({"v1", "inpainting"})
# Tensors a checkpoint may hold that no Flax module has: buffers and training leftovers.
IGNORED_SUFFIXES = ("position_ids", "logit_scale")
# diffusers' names for single-file model types that are not SDXL base, in words.
OTHER_MODEL_TYPES = {
    "v1": "Stable Diffusion 1.x (or no diffusion model at all)",
    "v2": "Stable Diffusion 2.x",
    "inpainting": "Stable Diffusion 1.x inpainting",
    "inpainting_v2": "Stable Diffusion 2.x inpainting",
    "xl_refiner": "the SDXL refiner",
    "playground-v2-5": "Playground v2.5",
    "sd3": "Stable Diffusion 3",
    "sd35_large": "Stable Diffusion 3.5 Large",
    "sd35_medium": "Stable Diffusion 3.5 Medium",
    "upscale": "the Stable Diffusion x4 upscaler",
}
OTHER_PIPELINES = {
    "StableDiffusionPipeline": "Stable Diffusion 1.x/2.x",
    "FlaxStableDiffusionPipeline": "Stable Diffusion 1.x/2.x",
    "StableDiffusion3Pipeline": "Stable Diffusion 3",
    "StableDiffusionXLImg2ImgPipeline": "the SDXL refiner (image to image)",
}

Format = Literal["flax", "diffusers", "single_file"]
Rename = Callable[[str, np.ndarray, Mapping[tuple[str, ...], Any]], tuple[tuple[str, ...], np.ndarray]]


class CheckpointError(Exception):
    """A model that cannot be loaded; the message names the file, the component or the tensor."""


class WrongArchitecture(CheckpointError):
    """A checkpoint of another model than SDXL base (SD 1.5, SD3, the refiner...)."""


class UnreadableCheckpoint(CheckpointError):
    """A file that is not a complete safetensors file, or a pickle, or no weights at all."""


class MissingTensors(CheckpointError):
    """Parameters of the architecture that the checkpoint does not have."""


class UnexpectedShape(CheckpointError):
    """A tensor whose shape is not the one the architecture expects."""


@dataclass(frozen=True)
class Located:
    """Where a model's weights and its configuration (configs, tokenizers, scheduler) are on disk."""

    format: Format
    weights: Path
    layout: Path


def load_checkpoint(
    model: str, revision: str | None = None, model_config: str | None = None, variant: str | None = None
) -> tuple[FlaxStableDiffusionXLPipeline, dict[str, Any]]:
    """The pipeline's modules and its host parameters: numpy bfloat16 weights, the scheduler's state."""
    located = locate(model, revision, model_config, variant)
    logger.info("loading %s: %s weights from %s", model, located.format, located.weights)
    if located.format == "flax":
        return _load_flax(located.layout, revision)
    check_pipeline_index(located.layout)
    parts = modules(located.layout)
    if located.format == "single_file":
        parts["unet"] = with_in_channels(parts["unet"], single_file_in_channels(located.weights))
    check_architecture(parts, located.layout)
    expected = _expected_params(parts)
    if located.format == "single_file":
        params = _load_single_file(located.weights, parts, expected)
    else:
        params = {name: _load_pytorch_component(located.weights, name, expected[name], variant) for name in WEIGHTED}
    scheduler = parts.pop("scheduler_state")
    pipe = FlaxStableDiffusionXLPipeline(**parts, dtype=jnp.bfloat16)
    return pipe, {**params, "scheduler": scheduler}


def locate(model: str, revision: str | None, model_config: str | None, variant: str | None = None) -> Located:
    """Decide what `model` is: a single file, a local folder (Flax or PyTorch weights), or a hub id."""
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise UnreadableCheckpoint(
                f"{path}: a pickled PyTorch checkpoint; not loaded (unpickling can run code, and needs torch). "
                "Use the .safetensors release of the model"
            )
        return Located("single_file", path, _config_folder(model_config or DEFAULT_CONFIG_REPO, None))
    if path.is_dir():
        return Located(folder_format(path), path, path)
    if path.is_absolute() or model.startswith(".") or model.count("/") != 1:
        raise CheckpointError(f"--model {model!r}: no such file or folder, and not a hub id (owner/name)")
    folder = _download(model, revision, variant)
    return Located(folder_format(folder), folder, folder)


def folder_format(folder: Path) -> Format:
    """Flax when every component has Flax weights, else PyTorch safetensors; an error when neither."""
    if not (folder / "model_index.json").is_file():
        raise CheckpointError(f"{folder}: no model_index.json; not a diffusers-layout model folder")
    if all((folder / name / FLAX_FILES[name]).is_file() for name in WEIGHTED):
        return "flax"
    if any(list((folder / name).glob("*.safetensors")) for name in WEIGHTED):
        return "diffusers"
    pickles = sorted(str(p.relative_to(folder)) for p in folder.glob("*/*.bin"))
    if pickles:
        raise UnreadableCheckpoint(
            f"{folder}: only pickled PyTorch weights ({', '.join(pickles[:3])}); not loaded (unpickling can run "
            "code, and needs torch). Use a revision with safetensors or Flax weights"
        )
    raise UnreadableCheckpoint(f"{folder}: no Flax (*.msgpack) or safetensors weights for {', '.join(WEIGHTED)}")


def hub_patterns(files: Iterable[str], variant: str | None = None) -> list[str]:
    """The files of a hub repository to fetch: configs, tokenizers, and one set of weights (Flax when
    complete, else the preferred PyTorch safetensors variant)."""
    present = set(files)
    if variant is None and all(f"{name}/{FLAX_FILES[name]}" in present for name in WEIGHTED):
        return [*CONFIG_PATTERNS, *(f"{name}/{FLAX_FILES[name]}" for name in WEIGHTED)]
    for candidate in (variant,) if variant else VARIANTS:
        if all(_pytorch_file_names(name, candidate) & present for name in WEIGHTED):
            tag = f".{candidate}" if candidate else ""
            stems = sorted({f"{name}/{PYTORCH_STEMS[name]}" for name in WEIGHTED})
            patterns = [f"{stem}{tag}.safetensors" for stem in stems]
            patterns += [f"{stem}.safetensors.index{tag}.json" for stem in stems]
            patterns += [f"{stem}-*-of-*{tag}.safetensors" for stem in stems]
            return [*CONFIG_PATTERNS, *patterns]
    raise UnreadableCheckpoint("the repository has neither Flax weights nor safetensors for every component")


def _pytorch_file_names(component: str, variant: str | None) -> set[str]:
    stem, tag = f"{component}/{PYTORCH_STEMS[component]}", f".{variant}" if variant else ""
    return {f"{stem}{tag}.safetensors", f"{stem}.safetensors.index{tag}.json"}


def _download(repo: str, revision: str | None, variant: str | None) -> Path:
    from huggingface_hub import HfApi, snapshot_download

    try:
        patterns = hub_patterns(HfApi().list_repo_files(repo, revision=revision), variant)
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # hub errors have many types (offline, refused, 401, 404); the message says what to do
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise CheckpointError(
            f"--model {repo!r}: could not be fetched from the Hugging Face hub ({type(exc).__name__}: {reason}); "
            "check the network (or HF_ENDPOINT, HF_TOKEN), or pass a local folder or .safetensors file as --model "
            "(`sdxl-serve tiny-model DIR` makes a small random one)"
        ) from exc


def _config_folder(source: str, revision: str | None) -> Path:
    """A diffusers-layout folder with configs and tokenizers: `source` itself, or fetched from the hub."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, revision=revision, allow_patterns=list(CONFIG_PATTERNS)))
    except Exception as exc:  # hub errors have many types; the message says what to do instead
        raise CheckpointError(
            f"a single-file checkpoint takes its configs and tokenizers from {source!r}, which could not be "
            f"fetched ({type(exc).__name__}: {exc}); pass a local diffusers-layout folder as the model config"
        ) from exc


def _load_flax(folder: Path, revision: str | None) -> tuple[FlaxStableDiffusionXLPipeline, dict[str, Any]]:
    check_pipeline_index(folder)
    pipe, params = FlaxStableDiffusionXLPipeline.from_pretrained(
        str(folder), revision=revision, split_head_dim=True, dtype=jnp.bfloat16
    )
    scheduler_state = params.pop("scheduler")
    # Cast on the host: a device-side cast would compile one conversion per parameter shape.
    params = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(jnp.bfloat16), params)
    return pipe, {**params, "scheduler": scheduler_state}


def check_pipeline_index(folder: Path) -> None:
    """Refuse a diffusers-layout model of another pipeline than SDXL base, by its model_index.json."""
    index = json.loads((folder / "model_index.json").read_text())
    cls = str(index.get("_class_name", ""))
    if cls in OTHER_PIPELINES:
        raise WrongArchitecture(f"{folder}: a {cls} model ({OTHER_PIPELINES[cls]}), not SDXL base")
    present = {name for name in (*WEIGHTED, "tokenizer", "tokenizer_2") if (index.get(name) or [None])[0]}
    missing = sorted({*WEIGHTED, "tokenizer", "tokenizer_2"} - present)
    if missing or cls not in SDXL_PIPELINES:
        raise WrongArchitecture(
            f"{folder}: a {cls or 'unnamed'} pipeline{' without ' + ', '.join(missing) if missing else ''}; "
            "SDXL base has two text encoders, a UNet and a VAE"
        )


def modules(layout: Path) -> dict[str, Any]:
    """The Flax modules (no weights), tokenizers and Euler scheduler described by a diffusers-layout folder,
    as keyword arguments of `FlaxStableDiffusionXLPipeline`, plus `scheduler_state`."""
    from diffusers import FlaxAutoencoderKL, FlaxEulerDiscreteScheduler, FlaxUNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTokenizer, FlaxCLIPTextModel, FlaxCLIPTextModelWithProjection

    def config(cls: Any, name: str) -> Any:
        return cls.load_config(str(layout / name))

    scheduler = FlaxEulerDiscreteScheduler.from_config(config(FlaxEulerDiscreteScheduler, "scheduler"))
    # The text encoders compute in float32 (on bfloat16 weights), as `FlaxStableDiffusionXLPipeline.from_pretrained`
    # builds them for the Flax format: the same modules whatever the format, so the same images.
    return {
        "text_encoder": FlaxCLIPTextModel(CLIPTextConfig.from_pretrained(str(layout / "text_encoder")), _do_init=False),
        "text_encoder_2": FlaxCLIPTextModelWithProjection(
            CLIPTextConfig.from_pretrained(str(layout / "text_encoder_2")), _do_init=False
        ),
        "tokenizer": CLIPTokenizer.from_pretrained(str(layout / "tokenizer")),
        "tokenizer_2": CLIPTokenizer.from_pretrained(str(layout / "tokenizer_2")),
        "unet": FlaxUNet2DConditionModel.from_config(
            config(FlaxUNet2DConditionModel, "unet"), split_head_dim=True, dtype=jnp.bfloat16
        ),
        "vae": FlaxAutoencoderKL.from_config(config(FlaxAutoencoderKL, "vae"), dtype=jnp.bfloat16),
        "scheduler": scheduler,
        "scheduler_state": scheduler.create_state(),
    }


def check_architecture(parts: Mapping[str, Any], layout: Path) -> None:
    """SDXL base's UNet takes six time ids and the second encoder's pooled projection (the refiner: five), and 4
    input channels (9 for inpainting)."""
    unet = parts["unet"].config
    if unet.in_channels not in UNET_IN_CHANNELS:
        raise WrongArchitecture(
            f"{layout}/unet: {unet.in_channels} input channels; SDXL's UNet takes 4 (9 for an inpainting model)"
        )
    if unet.addition_embed_type != "text_time":
        raise WrongArchitecture(f"{layout}/unet: no SDXL size conditioning (addition_embed_type text_time)")
    pooled = parts["text_encoder_2"].config.projection_dim
    time_ids, remainder = divmod(unet.projection_class_embeddings_input_dim - pooled, unet.addition_time_embed_dim)
    if (time_ids, remainder) != (6, 0):
        raise WrongArchitecture(
            f"{layout}/unet: conditioned on {time_ids} time ids, SDXL base on 6 (the refiner uses 5 with an "
            "aesthetic score)"
        )


def _expected_params(parts: Mapping[str, Any]) -> dict[str, dict[tuple[str, ...], Any]]:
    """Per component, its parameters' flattened paths and shapes (nothing allocated)."""
    from worker.sdxl_arch import abstract_params

    return {name: flatten_dict(tree) for name, tree in abstract_params(parts).items()}  # type: ignore[no-untyped-call]


def _load_pytorch_component(
    folder: Path, name: str, expected: Mapping[tuple[str, ...], Any], variant: str | None
) -> dict[str, Any]:
    files = pytorch_files(folder / name, PYTORCH_STEMS[name], variant)
    logger.info("%s: reading %s", name, ", ".join(str(f.relative_to(folder)) for f in files))
    with ExitStack() as stack:
        tensors: dict[str, TensorRef] = {}
        for path in files:
            tensors.update(_open(stack, path).refs())
        return convert_component(name, tensors, expected, _RENAMES[name])


def pytorch_files(directory: Path, stem: str, variant: str | None = None) -> list[Path]:
    """The safetensors files of one component: `variant` if given, else the first of `VARIANTS` present;
    one file, or the shards an index lists."""
    for candidate in (variant,) if variant else VARIANTS:
        tag = f".{candidate}" if candidate else ""
        single = directory / f"{stem}{tag}.safetensors"
        if single.is_file():
            return [single]
        index = directory / f"{stem}.safetensors.index{tag}.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [directory / shard for shard in shards]
    wanted = f"{stem}.{variant}.safetensors" if variant else f"{stem}[.fp16|.bf16].safetensors"
    raise UnreadableCheckpoint(f"{directory}: no {wanted}")


def _open(stack: ExitStack, path: Path) -> SafetensorsFile:
    if not path.is_file():
        raise UnreadableCheckpoint(f"{path}: listed by the index but not there")
    try:
        return stack.enter_context(SafetensorsFile(path))
    except UnreadableFile as exc:
        raise UnreadableCheckpoint(str(exc)) from exc


def _load_single_file(
    path: Path, parts: Mapping[str, Any], expected: Mapping[str, Mapping[tuple[str, ...], Any]]
) -> dict[str, Any]:
    with ExitStack() as stack:
        checkpoint = _open(stack, path).refs()
        check_single_file(path, checkpoint)
        by_component = {
            "unet": ldm_conversion.unet_names(checkpoint, parts["unet"].config),
            "vae": ldm_conversion.vae_names(checkpoint, parts["vae"].config),
            "text_encoder": ldm_conversion.clip_l_names(checkpoint),
            "text_encoder_2": ldm_conversion.open_clip_names(checkpoint),
        }
        return {name: convert_component(name, by_component[name], expected[name], _RENAMES[name]) for name in WEIGHTED}


def check_single_file(path: Path, checkpoint: Mapping[str, TensorRef]) -> None:
    """Refuse a single file that is not SDXL base or SDXL inpainting, by its tensor names and shapes (diffusers'
    detection)."""
    try:
        kind = ldm_conversion.model_type(checkpoint)
    except (KeyError, IndexError, AttributeError, ValueError, NameError) as exc:
        raise WrongArchitecture(f"{path}: not a checkpoint diffusers recognises ({exc})") from exc
    prefixes = (
        ldm_conversion.UNET_PREFIX,
        ldm_conversion.VAE_PREFIX,
        ldm_conversion.CLIP_L_PREFIX,
        ldm_conversion.OPEN_CLIP_PREFIX,
    )
    missing = [p for p in prefixes if not any(name.startswith(p) for name in checkpoint)]
    if (kind in OTHER_MODEL_TYPES and kind not in SMALL_SDXL_LOOKALIKES) or missing:
        what = OTHER_MODEL_TYPES.get(kind, f"a {kind!r} model")
        lacking = f" (no {', '.join(p + '*' for p in missing)})" if missing else ""
        raise WrongArchitecture(f"{path}: {what}{lacking}, not an SDXL base checkpoint")


def single_file_in_channels(path: Path) -> int:
    """The input channels of a single file's UNet (4, or 9 for inpainting), read from its header, once the file is
    known to be SDXL (`check_single_file`)."""
    with ExitStack() as stack:
        checkpoint = _open(stack, path).refs()
        check_single_file(path, checkpoint)
        if UNET_CONV_IN not in checkpoint:
            raise MissingTensors(f"{path}: no {UNET_CONV_IN} (the UNet's first convolution)")
        return int(checkpoint[UNET_CONV_IN].shape[1])


def with_in_channels(unet: Any, in_channels: int) -> Any:
    """`unet`, or the same UNet taking `in_channels` inputs: a single file's configs come from another folder (SDXL
    base's by default), and diffusers too gives an inpainting file's UNet the channels its weights have."""
    if unet.config.in_channels == in_channels:
        return unet
    from diffusers import FlaxUNet2DConditionModel

    config = {**unet.config, "in_channels": in_channels}
    return FlaxUNet2DConditionModel.from_config(config, split_head_dim=True, dtype=jnp.bfloat16)


def convert_component(
    component: str, tensors: Mapping[str, TensorRef], expected: Mapping[tuple[str, ...], Any], rename: Rename
) -> dict[str, Any]:
    """Read, rename, reshape and cast each tensor to bfloat16; check it against the expected parameters."""
    converted: dict[tuple[str, ...], np.ndarray] = {}
    unexpected = []
    for name, ref in tensors.items():
        if name.endswith(IGNORED_SUFFIXES):
            continue
        key, array = _renamed(component, name, ref, expected, rename)
        if key not in expected:
            unexpected.append(name)
            continue
        if array.shape != tuple(expected[key].shape):
            raise UnexpectedShape(
                f"{component}: tensor {name} has shape {list(array.shape)}; this architecture's "
                f"{'/'.join(key)} is {list(expected[key].shape)}"
            )
        converted[key] = array.astype(jnp.bfloat16)
    missing = ["/".join(key) for key in expected if key not in converted]
    if missing:
        raise MissingTensors(
            f"{component}: {len(missing)} of {len(expected)} parameters are not in the checkpoint, "
            f"first {', '.join(missing[:5])}"
        )
    if unexpected:
        logger.warning("%s: %d tensors unused, first %s", component, len(unexpected), ", ".join(unexpected[:5]))
    return dict(unflatten_dict(converted))  # type: ignore[no-untyped-call]


def _renamed(
    component: str, name: str, ref: TensorRef, expected: Mapping[tuple[str, ...], Any], rename: Rename
) -> tuple[tuple[str, ...], np.ndarray]:
    if ref is None:  # diffusers' single-file conversion maps a tensor the file lacks to None
        raise MissingTensors(f"{component}: tensor {name} is not in the checkpoint")
    try:
        return rename(name, ref.read(), expected)
    except AssertionError as exc:  # diffusers asserts attention shapes while renaming
        raise UnexpectedShape(
            f"{component}: tensor {name} has shape {list(ref.shape)}, not this architecture's"
        ) from exc


def _diffusers_rename(
    name: str, array: np.ndarray, expected: Mapping[tuple[str, ...], Any]
) -> tuple[tuple[str, ...], np.ndarray]:
    """diffusers' own PyTorch-to-Flax renaming (the one `from_pretrained(from_pt=True)` uses)."""
    from diffusers.models.modeling_flax_pytorch_utils import rename_key, rename_key_and_reshape_tensor

    key, array = rename_key_and_reshape_tensor(tuple(rename_key(name).split(".")), array, expected)
    return tuple(key), array


def _transformers_rename(
    name: str, array: np.ndarray, expected: Mapping[tuple[str, ...], Any]
) -> tuple[tuple[str, ...], np.ndarray]:
    """transformers' own PyTorch-to-Flax renaming (the one its `from_pt=True` uses)."""
    from transformers.modeling_flax_pytorch_utils import rename_key_and_reshape_tensor

    key, array = rename_key_and_reshape_tensor(tuple(name.split(".")), array, expected, "")
    return tuple(key), array


_RENAMES: dict[str, Rename] = {
    "text_encoder": _transformers_rename,
    "text_encoder_2": _transformers_rename,
    "unet": _diffusers_rename,
    "vae": _diffusers_rename,
}
