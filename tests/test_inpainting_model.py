"""SDXL inpainting checkpoints (a 9-channel UNet) on the tiny model written by `sdxl-serve tiny-model --inpainting`:
each format loads with its 9 channels and the weights written, the pipeline knows its kind and refuses
text-to-image in words, the VAE encoder runs on it, and `inpainting_unet_input` is what its UNet takes."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from common.input_images import to_model_input
from common.protocol import REQUEST_KINDS, RequestKind, Size
from testkit import sdxl_serve_argv
from worker.checkpoints import WEIGHTED, WrongArchitecture, load_checkpoint
from worker.img2img import INPAINTING_IN_CHANNELS, inpainting_unet_input, latent_mask, masked_image
from worker.inpainting_model import (
    InpaintingOnly,
    check_text_to_image,
    is_inpainting,
    kinds_before_loading,
    unet_in_channels,
)
from worker.pipeline import PipelineOptions, SDXLPipeline, _Clock
from worker.presence import advertised_kinds
from worker.tiny_formats import flax_params, write_diffusers_safetensors, write_single_file
from worker.tiny_model import MAX_TOKENS, TEXT_HIDDEN
from worker.vae_encoder import VaeEncoder

SIZE = Size(width=64, height=64)
FACTOR = 2  # the tiny VAE's
OPTIONS = PipelineOptions(images_per_request=4, max_steps=1)


@pytest.fixture(scope="module")
def inpainting_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a 9-channel UNet, written by the CLI as a user would."""
    directory = tmp_path_factory.mktemp("models") / "tiny-sdxl-inpainting"
    subprocess.run(sdxl_serve_argv("tiny-model", "--inpainting", str(directory)), check=True, stdout=subprocess.DEVNULL)
    return directory


@pytest.fixture(scope="module")
def formats(inpainting_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inpainting-formats")
    return {
        "flax": inpainting_model,
        "diffusers-fp32": write_diffusers_safetensors(inpainting_model, root / "fp32"),
        "diffusers-fp16-variant": write_diffusers_safetensors(inpainting_model, root / "fp16", np.float16, "fp16"),
        "single-file-fp16": write_single_file(inpainting_model, root / "inpainting-fp16.safetensors"),
        "single-file-fp32": write_single_file(inpainting_model, root / "inpainting.safetensors", np.float32),
    }


STORED = {
    "flax": np.float32,
    "diffusers-fp32": np.float32,
    "diffusers-fp16-variant": np.float16,
    "single-file-fp16": np.float16,
    "single-file-fp32": np.float32,
}


@pytest.fixture(scope="module")
def written(inpainting_model: Path) -> dict[str, Any]:
    """The float32 weights the writer made, flattened per component."""
    return {name: flatten_dict(tree) for name, tree in flax_params(inpainting_model).items()}  # type: ignore[no-untyped-call]


@pytest.fixture(scope="module")
def pipeline(inpainting_model: Path) -> SDXLPipeline:
    return SDXLPipeline.load(str(inpainting_model), None, OPTIONS)


def test_the_writer_names_the_inpainting_pipeline_and_nine_channels(formats: dict[str, Path]) -> None:
    for name in ("flax", "diffusers-fp32"):
        unet = json.loads((formats[name] / "unet" / "config.json").read_text())
        assert (unet["in_channels"], unet["out_channels"]) == (INPAINTING_IN_CHANNELS, 4), name
    index = json.loads((formats["diffusers-fp32"] / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLInpaintPipeline"  # as published SDXL inpainting folders


@pytest.mark.parametrize("name", list(STORED))
def test_each_format_loads_nine_channels_and_the_weights_written(
    name: str, formats: dict[str, Path], inpainting_model: Path, written: dict[str, Any]
) -> None:
    config = str(inpainting_model) if formats[name].is_file() else None
    pipe, params = load_checkpoint(str(formats[name]), model_config=config)
    assert pipe.unet.config.in_channels == INPAINTING_IN_CHANNELS
    assert params["unet"]["conv_in"]["kernel"].shape == (3, 3, INPAINTING_IN_CHANNELS, 32)
    for component in WEIGHTED:
        loaded = flatten_dict(params[component])  # type: ignore[no-untyped-call]
        assert loaded.keys() == written[component].keys(), component
        for key, value in loaded.items():
            expected = written[component][key].astype(STORED[name]).astype(jnp.bfloat16)
            np.testing.assert_array_equal(value, expected, err_msg=f"{name} {component} {'/'.join(key)}")


def test_a_single_file_takes_its_channels_from_its_weights_not_from_the_config(
    formats: dict[str, Path], tiny_model: Path
) -> None:
    """The configs of a single file come from another folder (SDXL base's, 4 channels, by default)."""
    assert json.loads((tiny_model / "unet" / "config.json").read_text())["in_channels"] == 4
    pipe, params = load_checkpoint(str(formats["single-file-fp16"]), model_config=str(tiny_model))
    assert pipe.unet.config.in_channels == INPAINTING_IN_CHANNELS
    assert params["unet"]["conv_in"]["kernel"].shape[2] == INPAINTING_IN_CHANNELS


def test_a_unet_of_other_input_channels_is_refused(formats: dict[str, Path], tmp_path: Path) -> None:
    folder = shutil.copytree(formats["diffusers-fp32"], tmp_path / "model")
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "in_channels": 5}))
    with pytest.raises(WrongArchitecture, match="5 input channels; SDXL's UNet takes 4 \\(9 for an inpainting"):
        load_checkpoint(str(folder))


def test_the_pipeline_knows_its_kind_and_refuses_text_to_image_in_words(
    pipeline: SDXLPipeline, tiny_model: Path
) -> None:
    assert (unet_in_channels(pipeline), is_inpainting(pipeline)) == (INPAINTING_IN_CHANNELS, True)
    assert pipeline.request_kinds == ("inpainting",)
    with pytest.raises(InpaintingOnly, match=r"inpainting model .* not text-to-image"):
        check_text_to_image(pipeline)
    base = SDXLPipeline.load(str(tiny_model), None, OPTIONS)
    assert (unet_in_channels(base), is_inpainting(base)) == (4, False)
    assert base.request_kinds == ("text-to-image", "image-to-image", "inpainting")
    check_text_to_image(base)


@pytest.mark.parametrize(
    ("model_kinds", "takes_images", "advertised"),
    [
        (REQUEST_KINDS, True, ["text-to-image", "image-to-image", "inpainting"]),
        (REQUEST_KINDS, False, ["text-to-image"]),  # `--engine request`: text only
        (("inpainting",), True, ["inpainting"]),
    ],
)
def test_a_worker_advertises_the_kinds_its_model_runs_of_those_its_engine_takes(
    model_kinds: tuple[RequestKind, ...], takes_images: bool, advertised: list[str]
) -> None:
    assert advertised_kinds(model_kinds, takes_images) == advertised


@pytest.mark.compile
def test_inpainting_unet_input_is_what_the_nine_channel_unet_takes(pipeline: SDXLPipeline) -> None:
    """The masked image through the compiled encoder, the mask at latent size, the step's latents: concatenated,
    the UNet (`pipe.unet.apply` on the host params) predicts 4-channel noise, and reads the mask channel."""
    encoder = VaeEncoder(pipeline)
    encoder.compile(SIZE, _Clock())
    rng = np.random.default_rng(0)
    image = to_model_input(rng.integers(0, 256, (SIZE.height, SIZE.width, 3), dtype=np.uint8))
    mask = np.zeros((SIZE.height, SIZE.width), bool)
    mask[16:48, 8:40] = True
    masked_latents = encoder.encode([masked_image(image, mask)])
    assert masked_latents.shape == (1, 4, 32, 32)
    latents = rng.standard_normal((1, 4, 32, 32)).astype(np.float32)
    small_mask = latent_mask(mask, FACTOR)[None]
    unet_input = inpainting_unet_input(latents, small_mask, masked_latents)
    assert unet_input.shape == (1, INPAINTING_IN_CHANNELS, 32, 32)
    noise = predict(pipeline, unet_input)
    assert noise.shape == (1, 4, 32, 32) and np.isfinite(noise).all()
    other_mask = inpainting_unet_input(latents, 1 - small_mask, masked_latents)
    assert not np.array_equal(predict(pipeline, other_mask), noise)


def predict(pipeline: SDXLPipeline, unet_input: np.ndarray) -> np.ndarray:
    """The UNet's noise prediction for one sample at timestep 500, on random text conditioning."""
    pipe = pipeline._pipe
    params = jax.tree_util.tree_map(np.asarray, pipeline._params["unet"])
    rng = np.random.default_rng(1)
    context = rng.standard_normal((1, MAX_TOKENS, 2 * TEXT_HIDDEN)).astype(np.float32)
    pooled = rng.standard_normal((1, TEXT_HIDDEN)).astype(np.float32)
    time_ids = np.array([[SIZE.height, SIZE.width, 0, 0, SIZE.height, SIZE.width]], np.float32)

    def apply(params: Any, sample: Any) -> Any:
        added = {"text_embeds": pooled, "time_ids": time_ids}
        return pipe.unet.apply(
            {"params": params}, sample, jnp.full((1,), 500), encoder_hidden_states=context, added_cond_kwargs=added
        ).sample

    return np.asarray(jax.jit(apply)(params, unet_input), np.float32)


def test_the_kinds_are_read_before_loading_from_a_folders_unet_config_or_a_single_files_header(
    formats: dict[str, Path], tiny_model: Path, tmp_path: Path
) -> None:
    """A folder's `unet/config.json` tells its kinds without its weights, a single file's header (its first
    convolution's shape) tells its own; a folder without the config, or a file that is no SDXL checkpoint, is known
    once loaded (None: the worker keeps its default until then)."""
    for name in ("flax", "diffusers-fp32", "diffusers-fp16-variant", "single-file-fp16", "single-file-fp32"):
        assert kinds_before_loading(str(formats[name]), None) == ("inpainting",), name
    assert kinds_before_loading(str(tiny_model), None) == REQUEST_KINDS
    base = write_single_file(tiny_model, tmp_path / "base.safetensors")
    assert kinds_before_loading(str(base), None) == REQUEST_KINDS
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    assert kinds_before_loading(str(tmp_path / "garbage.safetensors"), None) is None
    base.unlink()
    assert kinds_before_loading(str(tmp_path), None) is None
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{not json")
    assert kinds_before_loading(str(tmp_path), None) is None
