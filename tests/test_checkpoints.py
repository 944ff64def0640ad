"""Checkpoint formats on the tiny model: each loads to the Flax format's parameters and images; bad ones fail
at load with an error that names the problem."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file, save_file

from common.protocol import GenerationParams, Shape
from worker.checkpoints import (
    WEIGHTED,
    CheckpointError,
    MissingTensors,
    UnexpectedShape,
    UnreadableCheckpoint,
    WrongArchitecture,
    hub_patterns,
    load_checkpoint,
    locate,
    pytorch_files,
)
from worker.pipeline import PipelineOptions, SDXLPipeline
from worker.tiny_formats import flax_params, write_diffusers_safetensors, write_single_file

SHAPE = Shape(width=64, height=64, steps=2)
UNET_TENSOR = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"  # the first resnet's first convolution


@pytest.fixture(scope="module")
def formats(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny model written in each format (the Flax one is the model itself)."""
    root = tmp_path_factory.mktemp("formats")
    return {
        "flax": tiny_model,
        "diffusers-fp32": write_diffusers_safetensors(tiny_model, root / "fp32"),
        "diffusers-fp16-variant": write_diffusers_safetensors(tiny_model, root / "fp16", np.float16, "fp16"),
        "diffusers-bf16": write_diffusers_safetensors(tiny_model, root / "bf16", jnp.bfloat16),
        "single-file-fp16": write_single_file(tiny_model, root / "sdxl-tiny-fp16.safetensors"),
        "single-file-fp32": write_single_file(tiny_model, root / "sdxl-tiny.safetensors", np.float32),
    }


@pytest.fixture(scope="module")
def float32_params(tiny_model: Path) -> dict[str, Any]:
    return {name: flatten_dict(tree) for name, tree in flax_params(tiny_model).items()}  # type: ignore[no-untyped-call]


def load(model: Path, tiny_model: Path) -> dict[str, Any]:
    """Load as a worker does; a single file takes its configs and tokenizers from the tiny model."""
    config = str(tiny_model) if model.is_file() else None
    _, params = load_checkpoint(str(model), model_config=config)
    return params


# The dtype each format stores; serving casts it to bfloat16.
STORED = {
    "flax": np.float32,
    "diffusers-fp32": np.float32,
    "diffusers-fp16-variant": np.float16,
    "diffusers-bf16": jnp.bfloat16,
    "single-file-fp16": np.float16,
    "single-file-fp32": np.float32,
}


@pytest.mark.parametrize("name", list(STORED))
def test_each_format_loads_the_flax_parameters_as_stored(
    name: str, formats: dict[str, Path], tiny_model: Path, float32_params: dict[str, Any]
) -> None:
    """Bit for bit: the Flax model's float32 weights, rounded to the stored dtype, then to bfloat16."""
    params = load(formats[name], tiny_model)
    assert set(params) == {*WEIGHTED, "scheduler"}
    for component in WEIGHTED:
        loaded = flatten_dict(params[component])  # type: ignore[no-untyped-call]
        assert loaded.keys() == float32_params[component].keys(), component
        for key, value in loaded.items():
            expected = float32_params[component][key].astype(STORED[name]).astype(jnp.bfloat16)
            assert value.dtype == jnp.bfloat16
            np.testing.assert_array_equal(value, expected, err_msg=f"{name} {component} {'/'.join(key)}")


@pytest.mark.compile
def test_each_format_gives_the_flax_format_images(formats: dict[str, Path], tiny_model: Path) -> None:
    """The real pipeline (bfloat16, split heads, the folder's scheduler) from each format's loader."""
    images = {}
    for name in ("flax", "diffusers-fp32", "single-file-fp32"):
        config = str(tiny_model) if formats[name].is_file() else None
        pipeline = SDXLPipeline.load(
            str(formats[name]), None, PipelineOptions(images_per_request=4), model_config=config
        )
        pipeline.compile(SHAPE.size)
        images[name] = pipeline.generate(
            GenerationParams(prompt="a cat", negative_prompt="blurry", guidance_scale=7.5).resolved(SHAPE, seed=3)
        )
    assert images["flax"].std() > 0
    for name in ("diffusers-fp32", "single-file-fp32"):
        np.testing.assert_array_equal(images[name], images["flax"], err_msg=name)


def test_model_is_detected_as_folder_or_file(formats: dict[str, Path], tiny_model: Path) -> None:
    assert locate(str(formats["flax"]), None, None).format == "flax"
    assert locate(str(formats["diffusers-fp32"]), None, None).format == "diffusers"
    single = locate(str(formats["single-file-fp16"]), None, str(tiny_model))
    assert (single.format, single.weights, single.layout) == ("single_file", formats["single-file-fp16"], tiny_model)


def test_a_path_that_is_not_there_is_not_taken_for_a_hub_id(tmp_path: Path) -> None:
    for model in (str(tmp_path / "nothing"), "./nothing", "a/b/c"):
        with pytest.raises(CheckpointError, match="no such file or folder, and not a hub id"):
            locate(model, None, None)


def test_the_fp16_variant_is_preferred_and_an_explicit_variant_is_taken(tmp_path: Path) -> None:
    for tag in ("", ".fp16", ".bf16"):
        save_file({"x": np.zeros(1, np.float32)}, str(tmp_path / f"model{tag}.safetensors"))
    assert pytorch_files(tmp_path, "model") == [tmp_path / "model.fp16.safetensors"]
    assert pytorch_files(tmp_path, "model", "bf16") == [tmp_path / "model.bf16.safetensors"]
    with pytest.raises(UnreadableCheckpoint, match=r"no model\.fp32\.safetensors"):
        pytorch_files(tmp_path, "model", "fp32")


def test_sharded_weights_are_read_from_their_index(tmp_path: Path) -> None:
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": shards[1], "b": shards[0]}}))
    assert pytorch_files(tmp_path, "model") == [tmp_path / s for s in shards]


def test_hub_downloads_configs_and_one_set_of_weights() -> None:
    configs = ["model_index.json", "unet/config.json"]
    flax = [f"{c}/{'diffusion_' if c in ('unet', 'vae') else ''}flax_model.msgpack" for c in WEIGHTED]
    torch_names = [f"{c}/{'diffusion_pytorch_model' if c in ('unet', 'vae') else 'model'}" for c in WEIGHTED]
    plain = [f"{stem}.safetensors" for stem in torch_names]
    half = [f"{stem}.fp16.safetensors" for stem in torch_names]
    assert set(flax) <= set(hub_patterns([*configs, *flax, *plain]))
    patterns = hub_patterns([*configs, *plain, *half])
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in patterns
    assert not any(p.endswith("msgpack") or p == "unet/diffusion_pytorch_model.safetensors" for p in patterns)
    assert "unet/diffusion_pytorch_model.safetensors" in hub_patterns([*configs, *plain])
    with pytest.raises(UnreadableCheckpoint, match="neither Flax weights nor safetensors"):
        hub_patterns([*configs, *plain, *half], variant="bf16")
    with pytest.raises(UnreadableCheckpoint, match="neither Flax weights nor safetensors"):
        hub_patterns([*configs, *[f"{stem}.bin" for stem in torch_names]])


# Errors, each at load and naming the problem.


def rewrite(source: Path, target: Path, change: Callable[[dict[str, np.ndarray]], object]) -> Path:
    tensors = load_file(str(source))
    change(tensors)
    save_file(tensors, str(target))
    return target


def test_a_truncated_single_file_is_named(formats: dict[str, Path], tiny_model: Path, tmp_path: Path) -> None:
    data = formats["single-file-fp16"].read_bytes()
    truncated = tmp_path / "half.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableCheckpoint, match=r"half\.safetensors: not a complete safetensors file.*truncated"):
        load(truncated, tiny_model)


def test_a_truncated_component_file_is_named(formats: dict[str, Path], tiny_model: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(formats["diffusers-fp32"], tmp_path / "model")
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    unet.write_bytes(unet.read_bytes()[:1000])
    with pytest.raises(UnreadableCheckpoint, match=r"unet/diffusion_pytorch_model\.safetensors: not a complete"):
        load(folder, tiny_model)


def test_pickled_checkpoints_are_refused_unread(tmp_path: Path, tiny_model: Path) -> None:
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x04not read")
    with pytest.raises(UnreadableCheckpoint, match=r"model\.ckpt: a pickled PyTorch checkpoint"):
        load(ckpt, tiny_model)
    folder = shutil.copytree(tiny_model, tmp_path / "bin", ignore=shutil.ignore_patterns("*.msgpack"))
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(UnreadableCheckpoint, match=r"only pickled PyTorch weights \(unet/diffusion_pytorch_model"):
        load(folder, tiny_model)


def test_a_missing_tensor_is_named(formats: dict[str, Path], tiny_model: Path, tmp_path: Path) -> None:
    lacking = rewrite(formats["single-file-fp16"], tmp_path / "lacking.safetensors", lambda t: t.pop(UNET_TENSOR))
    with pytest.raises(MissingTensors, match=r"unet: 1 of \d+ parameters are not in the checkpoint, first "):
        load(lacking, tiny_model)
    folder = shutil.copytree(formats["diffusers-fp32"], tmp_path / "model")
    vae = folder / "vae" / "diffusion_pytorch_model.safetensors"
    rewrite(vae, vae, lambda t: t.pop("decoder.conv_out.weight"))
    with pytest.raises(MissingTensors, match=r"vae: 1 of .* first decoder/conv_out/kernel"):
        load(folder, tiny_model)


def test_an_unexpected_shape_is_named(formats: dict[str, Path], tiny_model: Path, tmp_path: Path) -> None:
    def widen(tensors: dict[str, np.ndarray]) -> None:
        tensors[UNET_TENSOR] = np.zeros((33, *tensors[UNET_TENSOR].shape[1:]), np.float16)

    wrong = rewrite(formats["single-file-fp16"], tmp_path / "wrong.safetensors", widen)
    with pytest.raises(UnexpectedShape, match=r"unet: tensor down_blocks\.0\.resnets\.0\.conv1\.weight has shape"):
        load(wrong, tiny_model)


def single_file_of(tmp_path: Path, name: str, tensors: dict[str, tuple[int, ...]]) -> Path:
    path = tmp_path / name
    save_file({key: np.zeros(shape, np.float16) for key, shape in tensors.items()}, str(path))
    return path


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        (
            {
                "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 8),
                UNET_TENSOR: (1,),
            },
            "Stable Diffusion 1.x",
        ),
        (
            {"conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias": (8,), UNET_TENSOR: (1,)},
            "the SDXL refiner",
        ),
        (
            {
                "model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": (9216,),
                "model.diffusion_model.pos_embed": (1, 36864, 1),
            },
            "Stable Diffusion 3",
        ),
        ({UNET_TENSOR: (1,), "first_stage_model.encoder.conv_in.weight": (1,)}, "no conditioner.embedders.0"),
    ],
    ids=["sd15", "refiner", "sd3", "no-text-encoders"],
)
def test_single_files_of_other_architectures_are_refused(
    tensors: dict[str, tuple[int, ...]], message: str, tmp_path: Path, tiny_model: Path
) -> None:
    with pytest.raises(WrongArchitecture, match=message):
        load(single_file_of(tmp_path, "other.safetensors", tensors), tiny_model)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda index, unet: index.update(_class_name="StableDiffusionPipeline"), "Stable Diffusion 1.x/2.x"),
        (lambda index, unet: index.update(_class_name="StableDiffusion3Pipeline"), "Stable Diffusion 3"),
        (lambda index, unet: index.update(text_encoder=[None, None]), "without text_encoder"),
        # The refiner's UNet: five time ids (and an aesthetic score) besides the pooled text.
        (lambda index, unet: unet.update(projection_class_embeddings_input_dim=5 * 8 + 32), "5 time ids"),
    ],
    ids=["sd15", "sd3", "refiner-index", "refiner-unet"],
)
def test_folders_of_other_architectures_are_refused(
    change: Callable[[dict[str, Any], dict[str, Any]], None], message: str, formats: dict[str, Path], tmp_path: Path
) -> None:
    folder = shutil.copytree(formats["diffusers-fp32"], tmp_path / "model")
    index, unet = (json.loads((folder / f).read_text()) for f in ("model_index.json", "unet/config.json"))
    change(index, unet)
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "unet" / "config.json").write_text(json.dumps(unet))
    with pytest.raises(WrongArchitecture, match=message):
        load(folder, folder)
