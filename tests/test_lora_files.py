"""LoRA files on the tiny model: kohya and diffusers/PEFT files read back to the updates written, whichever naming
and dtype; everything else is a LoraError naming the adapter and the tensor, whatever the bytes."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save, save_file

from testkit import sdxl_serve_argv
from worker.lora import Adapter, LoraError, Target
from worker.lora_files import layer_shapes, read_adapter
from worker.lora_source import LoraFolder
from worker.tiny_formats import flax_params
from worker.tiny_lora import write_tiny_lora

Tensors = dict[str, np.ndarray]
ATTN1_Q = ("unet", "down_blocks_1", "attentions_0", "transformer_blocks_0", "attn1", "to_q")
# The same layer in kohya's original-UNet naming, its diffusers naming, and PEFT's.
KOHYA_Q = "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q"
KOHYA_Q_DIFFUSERS = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
PROJ_IN = "lora_unet_input_blocks_3_1_proj_in"


@pytest.fixture(scope="module")
def params(tiny_model: Path) -> dict[str, Any]:
    return flax_params(tiny_model)


@pytest.fixture(scope="module")
def layers(params: dict[str, Any]) -> dict[Target, tuple[int, ...]]:
    return layer_shapes(params)


@pytest.fixture(scope="module")
def unet_config(tiny_model: Path) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((tiny_model / "unet" / "config.json").read_text())
    return config


@pytest.fixture
def kohya(tmp_path: Path, params: dict[str, Any], unet_config: dict[str, Any]) -> Tensors:
    """A kohya LoRA with LoCon convolutions, as sd-scripts names SDXL's layers."""
    path = tmp_path / "kohya.safetensors"
    write_tiny_lora(path, params, 4, fmt="kohya", unet_config=unet_config, alpha=2.0, convolutions=True)
    return read_tensors(path)


def read_tensors(path: Path) -> Tensors:
    with safe_open(str(path), framework="np") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def product(down: np.ndarray, up: np.ndarray) -> np.ndarray:
    product: np.ndarray = np.einsum("...ir,ro->...io", down, up)
    return product


def assert_reads_as(adapter: Adapter, updates: Mapping[Target, np.ndarray], layers: Mapping[Target, Any]) -> None:
    """The adapter has exactly the written targets, each factor in its layer's Flax layout, and each
    down @ up is the written update."""
    assert set(adapter.targets) == set(updates)
    for target, factors in adapter.targets.items():
        kernel = layers[target]
        assert factors.down.shape == (*kernel[:-1], factors.rank) and factors.up.shape == (factors.rank, kernel[-1])
        np.testing.assert_allclose(product(factors.down, factors.up), updates[target], rtol=1e-5, atol=1e-7)


def test_layer_shapes_are_every_kernel_of_the_three_components(layers: dict[Target, tuple[int, ...]]) -> None:
    assert layers[ATTN1_Q] == (64, 64)
    assert layers[("unet", "conv_in")] == (3, 3, 4, 32)
    assert layers[("text_encoder", "text_model", "encoder", "layers", "1", "mlp", "fc2")] == (37, 32)
    assert layers[("text_encoder_2", "text_projection")] == (32, 32)
    assert {target[0] for target in layers} == {"unet", "text_encoder", "text_encoder_2"}  # no VAE


def test_kohya_with_original_unet_names_and_locon_reads_back(
    tmp_path: Path, params: dict[str, Any], unet_config: dict[str, Any], layers: dict[Target, Any]
) -> None:
    path = tmp_path / "kohya.safetensors"
    updates = write_tiny_lora(path, params, 4, 7, "kohya", unet_config=unet_config, alpha=2.0, convolutions=True)
    keys = set(read_tensors(path))
    for stem in (KOHYA_Q, "lora_unet_middle_block_2_in_layers_2", "lora_unet_output_blocks_1_2_conv"):
        assert f"{stem}.lora_down.weight" in keys, stem
    assert "lora_unet_input_blocks_2_0_op.lora_down.weight" in keys
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc1.alpha" in keys
    adapter = read_adapter("style", path.read_bytes(), layers)
    assert_reads_as(adapter, updates, layers)
    assert adapter.name == "style" and adapter.rank == 4
    assert adapter.components() == {"unet", "text_encoder", "text_encoder_2"}
    conv = adapter.targets[("unet", "mid_block", "resnets_1", "conv1")]
    assert conv.down.shape == (3, 3, 64, 4)  # a LoCon down: the layer's 3x3 convolution


def test_kohya_with_diffusers_unet_names_reads_as_the_original_names(
    tmp_path: Path, params: dict[str, Any], unet_config: dict[str, Any], layers: dict[Target, Any]
) -> None:
    original, diffusers = tmp_path / "original.safetensors", tmp_path / "diffusers.safetensors"
    updates = write_tiny_lora(original, params, 3, 1, "kohya", unet_config=unet_config, convolutions=True)
    assert write_tiny_lora(diffusers, params, 3, 1, "kohya", convolutions=True).keys() == updates.keys()
    assert f"{KOHYA_Q_DIFFUSERS}.lora_up.weight" in read_tensors(diffusers)
    from_original = read_adapter("a", original.read_bytes(), layers)
    from_diffusers = read_adapter("a", diffusers.read_bytes(), layers)
    assert_reads_as(from_diffusers, updates, layers)
    for target, factors in from_original.targets.items():
        np.testing.assert_array_equal(factors.down, from_diffusers.targets[target].down)
        np.testing.assert_array_equal(factors.up, from_diffusers.targets[target].up)


@pytest.mark.parametrize(
    ("alpha", "dtype"), [(None, np.float32), (3.0, np.float32), (None, np.float16), (8.0, ml_dtypes.bfloat16)]
)
def test_peft_reads_back_with_its_alpha_or_scale_one(
    tmp_path: Path, params: dict[str, Any], layers: dict[Target, Any], alpha: float | None, dtype: Any
) -> None:
    path = tmp_path / "peft.safetensors"
    updates = write_tiny_lora(path, params, 4, 2, "peft", alpha=alpha, dtype=dtype)
    adapter = read_adapter("p", path.read_bytes(), layers)
    assert_reads_as(adapter, updates, layers)
    assert all(factors.down.dtype == np.float32 for factors in adapter.targets.values())


def test_only_the_components_written_are_read(tmp_path: Path, params: dict[str, Any], layers: Any) -> None:
    path = tmp_path / "te.safetensors"
    updates = write_tiny_lora(path, params, 2, fmt="peft", components=("text_encoder", "text_encoder_2"))
    adapter = read_adapter("te", path.read_bytes(), layers)
    assert adapter.components() == {"text_encoder", "text_encoder_2"}
    assert_reads_as(adapter, updates, layers)


def test_sd1_text_encoder_names_are_the_first_encoders(tmp_path: Path, params: dict[str, Any], layers: Any) -> None:
    path = tmp_path / "te1.safetensors"
    updates = write_tiny_lora(path, params, 2, fmt="kohya", components=("text_encoder",))
    tensors = {key.replace("lora_te1_", "lora_te_"): value for key, value in read_tensors(path).items()}
    assert_reads_as(read_adapter("sd1", save(tensors), layers), updates, layers)


# diffusers' own names before PEFT: `.lora.down.weight`, and the attention processors' `to_q_lora`.
OLDER_DIFFUSERS = [
    (r"\.lora_A\.weight$", ".lora.down.weight"),
    (r"\.lora_B\.weight$", ".lora.up.weight"),
    (r"^unet\.(.+)\.(to_[qkv])\.lora\.(down|up)", r"unet.\1.processor.\2_lora.\3"),
    (r"^unet\.(.+)\.to_out\.0\.lora\.(down|up)", r"unet.\1.processor.to_out_lora.\2"),
    (r"^(text_encoder(?:_2)?\..+)\.([qkv])_proj\.lora\.(down|up)", r"\1.to_\2_lora.\3"),
    (r"^(text_encoder(?:_2)?\..+)\.out_proj\.lora\.(down|up)", r"\1.to_out_lora.\2"),
]


def test_older_diffusers_names_read_as_peft_ones(tmp_path: Path, params: dict[str, Any], layers: Any) -> None:
    path = tmp_path / "peft.safetensors"
    updates = write_tiny_lora(path, params, 2, 3, "peft")
    tensors = read_tensors(path)
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_B.weight" in tensors
    assert "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    for pattern, replacement in OLDER_DIFFUSERS:
        tensors = {re.sub(pattern, replacement, key): value for key, value in tensors.items()}
    assert "unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.up.weight" in tensors
    assert "text_encoder.text_model.encoder.layers.0.self_attn.to_k_lora.down.weight" in tensors
    assert "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora.down.weight" in tensors
    assert_reads_as(read_adapter("old", save(tensors), layers), updates, layers)


Mutation = Callable[[Tensors], str]  # changes a kohya LoRA's tensors, returns the key the error must name


def _add(key: str, value: np.ndarray) -> Mutation:
    def mutate(tensors: Tensors) -> str:
        tensors[key] = value
        return key

    return mutate


def _delete(stem: str, part: str, blamed: str) -> Mutation:
    def mutate(tensors: Tensors) -> str:
        del tensors[f"{stem}.{part}"]
        return f"{stem}.{blamed}"

    return mutate


def _replace(key: str, change: Callable[[np.ndarray], np.ndarray]) -> Mutation:
    def mutate(tensors: Tensors) -> str:
        tensors[key] = change(tensors[key])
        return key

    return mutate


def _nan(array: np.ndarray) -> np.ndarray:
    array = array.copy()
    array[0, 0] = np.nan
    return array


def _inf(array: np.ndarray) -> np.ndarray:
    return np.full_like(array, np.inf)


DOWN, UP = f"{KOHYA_Q}.lora_down.weight", f"{KOHYA_Q}.lora_up.weight"
REFUSALS: dict[str, tuple[Mutation, str]] = {
    "no such layer": (_add("lora_unet_input_blocks_9_1_proj_in.lora_down.weight", np.ones((4, 64))), "names no layer"),
    "no such text layer": (_add("lora_te1_text_model_encoder_layers_5_mlp_fc1.alpha", np.ones(())), "names no layer"),
    "wrong shape": (_replace(DOWN, lambda a: np.ones((4, 63), np.float32)), "has shape [4, 63]"),
    "wrong out": (_replace(UP, lambda a: np.ones((65, 4), np.float32)), "has shape [65, 4]"),
    "down without up": (_delete(KOHYA_Q, "lora_up.weight", "lora_down.weight"), "has no up"),
    "up without down": (_delete(KOHYA_Q, "lora_down.weight", "lora_up.weight"), "has no down"),
    "rank mismatch": (_replace(UP, lambda a: np.ones((64, 5), np.float32)), "has rank 5, but its down"),
    "integer factors": (_replace(DOWN, lambda a: a.astype(np.int32)), "is I32"),
    "NaN": (_replace(DOWN, _nan), "NaN or infinite"),
    "inf": (_replace(UP, _inf), "NaN or infinite"),
    "NaN alpha": (_replace(f"{KOHYA_Q}.alpha", lambda a: np.array(np.nan, np.float32)), "NaN or infinite"),
    "alpha not a number": (_replace(f"{KOHYA_Q}.alpha", lambda a: np.ones(3, np.float32)), "one number"),
    "LoHa": (_add(f"{PROJ_IN}.hada_w1_a", np.ones((4, 64), np.float32)), "LoHa"),
    "LoKr": (_add(f"{PROJ_IN}.lokr_w1", np.ones((4, 4), np.float32)), "LoKr"),
    "DoRA": (_add(f"{PROJ_IN}.dora_scale", np.ones((64, 1), np.float32)), "DoRA"),
    "Tucker core": (_add(f"{PROJ_IN}.lora_mid.weight", np.ones((4, 4, 3, 3), np.float32)), "Tucker"),
    "full weight": (_add(f"{PROJ_IN}.diff", np.ones((64, 64), np.float32)), "full-weight difference"),
    "full bias": (_add(f"{PROJ_IN}.diff_b", np.ones(64, np.float32)), "full-weight difference"),
    "bias": (_add(f"{PROJ_IN}.lora_up.bias", np.ones(64, np.float32)), "an update of a layer's bias"),
    "unknown suffix": (_add(f"{PROJ_IN}.weight", np.ones((64, 64), np.float32)), "is not a LoRA tensor"),
    "two names, one layer": (_add(f"{KOHYA_Q_DIFFUSERS}.lora_down.weight", np.ones((4, 64))), "second down"),
    "conv LoRA on a linear layer": (
        _replace(f"{PROJ_IN}.lora_down.weight", lambda a: np.ones((4, 64, 3, 3), np.float32)),
        "3x3 convolution's down, but its layer is linear",
    ),
    "linear LoRA on a 3x3 convolution": (
        _replace("lora_unet_middle_block_0_in_layers_2.lora_down.weight", lambda a: np.ones((4, 64), np.float32)),
        "its 3x3 convolution takes [rank, 64, 3, 3]",
    ),
    "a 3x3 up": (
        _replace("lora_unet_middle_block_0_in_layers_2.lora_up.weight", lambda a: np.ones((64, 4, 3, 3), np.float32)),
        "has shape [64, 4, 3, 3]",
    ),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_name_the_adapter_and_the_tensor(kohya: Tensors, layers: Any, case: str) -> None:
    mutate, what = REFUSALS[case]
    key = mutate(kohya)
    with pytest.raises(LoraError) as error:
        read_adapter("my-style", save(kohya), layers)
    message = str(error.value)
    assert message.startswith("LoRA 'my-style': ") and repr(key) in message and what in message, message


def test_a_file_of_no_tensors_is_refused(tmp_path: Path, layers: Any) -> None:
    save_file({}, str(tmp_path / "empty.safetensors"))
    with pytest.raises(LoraError, match=r"^LoRA 'e': the file holds no tensors$"):
        read_adapter("e", (tmp_path / "empty.safetensors").read_bytes(), layers)


@pytest.mark.parametrize("data", [b"", b"not a safetensors file", b"\x10" + bytes(7) + b'{"a": 1}  '])
def test_bytes_that_are_not_safetensors_are_refused(layers: Any, data: bytes) -> None:
    with pytest.raises(LoraError, match=r"^LoRA 'x': not a safetensors file"):
        read_adapter("x", data, layers)


def test_any_bytes_give_an_adapter_or_a_lora_error(kohya: Tensors, layers: Any) -> None:
    """Random bytes, truncations and bytes changed anywhere in a real file: never another exception."""
    valid = save(kohya)
    rng = np.random.default_rng(0)
    outcomes = {"adapter": 0, "error": 0}
    for _ in range(150):
        changed = bytearray(valid)
        for _ in range(3):
            changed[int(rng.integers(0, len(changed)))] = int(rng.integers(0, 256))
        header = bytearray(valid)
        header[int(rng.integers(8, 8 + int.from_bytes(valid[:8], "little")))] = int(rng.integers(32, 127))
        for data in (rng.bytes(int(rng.integers(0, 64))), valid[: int(rng.integers(0, len(valid)))], changed, header):
            try:
                read_adapter("fuzz", bytes(data), layers)
                outcomes["adapter"] += 1
            except LoraError:
                outcomes["error"] += 1
    assert outcomes["error"] > 0 and outcomes["adapter"] > 0  # both kinds of bytes were tried


def test_the_cli_offers_every_format_the_writer_writes() -> None:
    from sdxl_serve.tiny_lora import FORMATS as CLI_FORMATS
    from worker.tiny_lora import FORMATS

    assert CLI_FORMATS == FORMATS


@pytest.mark.parametrize("fmt", ["kohya", "kohya-metadata", "peft", "diffusers", "peft-folder"])
def test_the_cli_writes_a_lora_that_reads_back(
    tmp_path: Path, tiny_model: Path, params: dict[str, Any], unet_config: dict[str, Any], layers: Any, fmt: Any
) -> None:
    out = tmp_path / "made" / f"{fmt}.safetensors"
    argv = ["tiny-lora", str(out), "--model", str(tiny_model), "--rank", "3", "--format", fmt, "--seed", "5"]
    result = subprocess.run(
        sdxl_serve_argv(*argv, "--alpha", "1.5", "--conv"), capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    # What the writer makes of the same arguments, in this process.
    updates = write_tiny_lora(
        tmp_path / "same.safetensors", params, 3, 5, fmt, unet_config=unet_config, alpha=1.5, convolutions=True
    )
    data, config = peft_folder(out) if fmt == "peft-folder" else (out.read_bytes(), None)
    assert_reads_as(read_adapter(fmt, data, layers, config), updates, layers)
    named = {"kohya": "lora_unet_input_blocks_2_0_op.alpha", "peft": "unet.down_blocks.0.downsamplers.0.conv.alpha"}
    assert fmt not in named or named[fmt] in read_tensors(out)


def test_the_cli_names_a_missing_model(tmp_path: Path) -> None:
    argv = ["tiny-lora", str(tmp_path / "x.safetensors"), "--model", str(tmp_path / "nowhere")]
    result = subprocess.run(sdxl_serve_argv(*argv), capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "--model" in result.stderr and "sdxl-serve tiny-model" in result.stderr
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("fmt", ["kohya-metadata", "diffusers"])
def test_an_alpha_in_the_header_scales_layers_without_an_alpha_tensor(
    tmp_path: Path, params: dict[str, Any], unet_config: dict[str, Any], layers: dict[Target, Any], fmt: Any
) -> None:
    path = tmp_path / "header.safetensors"
    updates = write_tiny_lora(path, params, 4, 3, fmt, unet_config=unet_config, alpha=2.0, convolutions=True)
    tensors = read_tensors(path)
    assert not any(key.endswith(".alpha") for key in tensors)
    assert_reads_as(read_adapter("h", path.read_bytes(), layers), updates, layers)
    # The same tensors without the header: alpha is the rank, twice the header's 2 / 4.
    doubled = {target: 2 * update for target, update in updates.items()}
    assert_reads_as(read_adapter("h", save(tensors), layers), doubled, layers)


def test_kohya_convolutions_take_the_conv_alpha_of_the_network_args(
    tmp_path: Path, params: dict[str, Any], unet_config: dict[str, Any], layers: dict[Target, Any]
) -> None:
    path = tmp_path / "locon.safetensors"
    updates = write_tiny_lora(
        path, params, 4, 3, "kohya-metadata", unet_config=unet_config, alpha=2.0, convolutions=True
    )
    metadata = {
        "ss_network_alpha": "2.0",
        "ss_network_dim": "4",
        "ss_network_args": '{"conv_dim": "4", "conv_alpha": "1"}',
    }
    adapter = read_adapter("l", save(read_tensors(path), metadata=metadata), layers)
    # 3x3 convolutions at alpha 1 (half of 2); linear layers and 1x1 convolutions at the network's alpha.
    halved = {
        target: update / 2 if update.ndim == 4 and update.shape[:2] != (1, 1) else update
        for target, update in updates.items()
    }
    assert any(update.ndim == 4 and update.shape[:2] == (3, 3) for update in updates.values())
    assert_reads_as(adapter, halved, layers)


def test_diffusers_metadata_scales_only_the_components_it_names(
    tmp_path: Path, params: dict[str, Any], layers: dict[Target, Any]
) -> None:
    path = tmp_path / "diffusers.safetensors"
    updates = write_tiny_lora(path, params, 4, 3, "diffusers", alpha=2.0)
    metadata = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 2.0})}
    # The text encoders, which the metadata does not name, at scale 1: twice the written 2 / 4.
    expected = {target: update * (1 if target[0] == "unet" else 2) for target, update in updates.items()}
    assert {target[0] for target in updates} == {"unet", "text_encoder", "text_encoder_2"}
    assert_reads_as(read_adapter("d", save(read_tensors(path), metadata=metadata), layers), expected, layers)


def test_an_alpha_tensor_wins_over_the_header(
    tmp_path: Path, params: dict[str, Any], unet_config: dict[str, Any], layers: dict[Target, Any]
) -> None:
    path = tmp_path / "kohya.safetensors"
    updates = write_tiny_lora(path, params, 4, 3, "kohya", unet_config=unet_config, alpha=2.0)
    data = save(read_tensors(path), metadata={"ss_network_alpha": "16.0", "ss_network_dim": "4"})
    assert_reads_as(read_adapter("k", data, layers), updates, layers)


def peft_folder(folder: Path) -> tuple[bytes, bytes]:
    return (folder / "adapter_model.safetensors").read_bytes(), (folder / "adapter_config.json").read_bytes()


def test_a_peft_folder_reads_with_the_alpha_of_its_config(
    tmp_path: Path, params: dict[str, Any], layers: dict[Target, Any]
) -> None:
    folder = tmp_path / "style"
    updates = write_tiny_lora(folder, params, 4, 4, "peft-folder", alpha=8.0, convolutions=True)
    keys = read_tensors(folder / "adapter_model.safetensors")
    assert "base_model.model.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    assert json.loads((folder / "adapter_config.json").read_text())["lora_alpha"] == 8.0
    data, config = peft_folder(folder)
    adapter = read_adapter("style", data, layers, config)
    assert adapter.components() == {"unet"}
    assert_reads_as(adapter, updates, layers)
    # Without its config the file reads at scale 1: 4 / 8 of the config's.
    assert_reads_as(read_adapter("style", data, layers), {t: u / 2 for t, u in updates.items()}, layers)


@pytest.mark.parametrize(
    ("change", "factor"),
    [
        # PEFT's alpha_pattern: a pattern that ends a module's name gives its alpha (2 for 8: a quarter).
        ({"alpha_pattern": {"attn1.to_q": 2.0}}, lambda target: 0.25 if target[-2:] == ("attn1", "to_q") else 1.0),
        (
            {"alpha_pattern": {"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": 4}},
            lambda t: 0.5 if t == ATTN1_Q else 1.0,
        ),
        # rsLoRA: alpha / sqrt(rank), twice alpha / rank at rank 4.
        ({"use_rslora": True}, lambda target: 2.0),
    ],
)
def test_a_peft_configs_alpha_pattern_and_rslora_scale_as_peft_does(
    tmp_path: Path, params: dict[str, Any], layers: dict[Target, Any], change: dict[str, Any], factor: Any
) -> None:
    folder = tmp_path / "style"
    updates = write_tiny_lora(folder, params, 4, 4, "peft-folder", alpha=8.0)
    data, config = peft_folder(folder)
    changed = json.dumps(json.loads(config) | change).encode()
    expected = {target: update * factor(target) for target, update in updates.items()}
    assert any(factor(target) != 1.0 for target in updates)
    assert_reads_as(read_adapter("style", data, layers, changed), expected, layers)


def test_a_peft_config_without_lora_alpha_has_peft_default_of_8(
    tmp_path: Path, params: dict[str, Any], layers: dict[Target, Any]
) -> None:
    folder = tmp_path / "style"
    updates = write_tiny_lora(folder, params, 4, 4, "peft-folder", alpha=8.0)
    data, _ = peft_folder(folder)
    assert_reads_as(read_adapter("style", data, layers, b'{"peft_type": "LORA", "r": 4}'), updates, layers)


CONFIG_REFUSALS: dict[str, tuple[bytes, str]] = {
    "not JSON": (b"{r: 4", "adapter_config.json is not JSON"),
    "not an object": (b"[4]", "adapter_config.json is not a JSON object"),
    "alpha a string": (b'{"r": 4, "lora_alpha": "eight"}', "adapter_config.json: 'lora_alpha' is 'eight'"),
    "alpha infinite": (b'{"r": 4, "lora_alpha": 1e999}', "adapter_config.json: 'lora_alpha' is inf"),
    "pattern's alpha": (
        b'{"lora_alpha": 8, "alpha_pattern": {"to_q": null}}',
        "adapter_config.json: \"alpha_pattern['to_q']\" is None",
    ),
    "bad pattern": (b'{"lora_alpha": 8, "alpha_pattern": {"(": 2}}', "\"alpha_pattern['(']\" is not a pattern"),
    "patterns a list": (b'{"lora_alpha": 8, "alpha_pattern": [2]}', "'alpha_pattern' is [2]"),
}


@pytest.mark.parametrize("case", CONFIG_REFUSALS)
def test_a_peft_config_it_cannot_use_is_refused_naming_the_file_and_key(
    tmp_path: Path, params: dict[str, Any], layers: dict[Target, Any], case: str
) -> None:
    folder = tmp_path / "style"
    write_tiny_lora(folder, params, 4, 4, "peft-folder", alpha=8.0)
    config, what = CONFIG_REFUSALS[case]
    with pytest.raises(LoraError) as error:
        read_adapter("bad", (folder / "adapter_model.safetensors").read_bytes(), layers, config)
    message = str(error.value)
    assert message.startswith("LoRA 'bad': ") and what in message, message


HEADER_REFUSALS: dict[str, tuple[dict[str, str], str]] = {
    "kohya alpha not a number": ({"ss_network_alpha": "abc"}, "the header's 'ss_network_alpha' is 'abc'"),
    "kohya alpha NaN": ({"ss_network_alpha": "nan"}, "the header's 'ss_network_alpha' is nan"),
    "kohya conv alpha": (
        {"ss_network_alpha": "2", "ss_network_args": '{"conv_alpha": "wide"}'},
        "the header's 'ss_network_args': 'conv_alpha' is 'wide'",
    ),
    "diffusers not JSON": ({"lora_adapter_metadata": "{"}, "the header's 'lora_adapter_metadata' is not JSON"),
    "diffusers alpha": (
        {"lora_adapter_metadata": '{"unet.r": 4, "unet.lora_alpha": "x"}'},
        "the header's 'lora_adapter_metadata': 'unet.lora_alpha' is 'x'",
    ),
}


@pytest.mark.parametrize("case", HEADER_REFUSALS)
def test_a_header_alpha_it_cannot_use_is_refused_naming_the_key(
    tmp_path: Path, params: dict[str, Any], layers: dict[Target, Any], case: str
) -> None:
    path = tmp_path / "k.safetensors"
    write_tiny_lora(path, params, 4, 4, "kohya-metadata", alpha=2.0)
    metadata, what = HEADER_REFUSALS[case]
    with pytest.raises(LoraError) as error:
        read_adapter("bad", save(read_tensors(path), metadata=metadata), layers)
    message = str(error.value)
    assert message.startswith("LoRA 'bad': ") and what in message, message


def test_a_diffusers_folder_in_a_lora_dir_reads_with_the_alpha_of_its_header(
    tmp_path: Path, params: dict[str, Any], layers: dict[Target, Any]
) -> None:
    """What `save_lora_weights(folder)` writes, offered by the folder's name and read as its lone file."""
    weights = tmp_path / "trained" / "pytorch_lora_weights.safetensors"
    weights.parent.mkdir()
    updates = write_tiny_lora(weights, params, 4, 6, "diffusers", alpha=2.0)
    source = LoraFolder(tmp_path, 1 << 20)
    assert source.scan() == ("trained",)
    files = source.read("trained")
    adapter = read_adapter("trained", files.weights, layers, files.config)
    assert adapter.components() == {"unet", "text_encoder", "text_encoder_2"}
    assert_reads_as(adapter, updates, layers)  # at the header's alpha: half of scale 1 at rank 4


def without_second_layer(layers: Mapping[Target, Any], encoder: str) -> dict[Target, Any]:
    """`layers` with `encoder` one layer shorter: the two encoders differ in depth, as SDXL's (12 and 32) do."""
    return {
        target: shape
        for target, shape in layers.items()
        if target[:5] != (encoder, "text_model", "encoder", "layers", "1")
    }


def widened(layers: Mapping[Target, Any], encoder: str) -> dict[Target, Any]:
    """`layers` with `encoder` wider (48 for 32): the two differ in width, as SDXL's (768 and 1280) do."""
    return {
        target: tuple(48 if n == 32 else n for n in shape) if target[0] == encoder else shape
        for target, shape in layers.items()
    }


@pytest.mark.parametrize(
    ("encoder", "model"),
    [("text_encoder_2", lambda layers: without_second_layer(layers, "text_encoder")),
     ("text_encoder", lambda layers: widened(layers, "text_encoder_2"))],
    ids=["by-depth", "by-width"],
)  # fmt: skip
def test_a_peft_folder_of_a_text_encoder_reads_as_the_encoder_its_layers_fit(
    tmp_path: Path, params: dict[str, Any], layers: dict[Target, Any], encoder: str, model: Any
) -> None:
    folder = tmp_path / "te"
    updates = write_tiny_lora(folder, params, 4, 8, "peft-folder", components=(encoder,), alpha=8.0)
    data, config = peft_folder(folder)
    assert "base_model.model.text_model.encoder.layers.1.mlp.fc1.lora_A.weight" in read_tensors(
        folder / "adapter_model.safetensors"
    )
    shapes = model(layers)
    adapter = read_adapter("te", data, shapes, config)
    assert adapter.components() == {encoder}
    assert_reads_as(adapter, updates, shapes)


def test_a_peft_folder_of_a_text_encoder_both_encoders_fit_is_refused_naming_the_rule(
    tmp_path: Path, params: dict[str, Any], layers: dict[Target, Any]
) -> None:
    """The tiny model's two text encoders have the same layers and shapes: which one the file is for is unknown."""
    folder = tmp_path / "te"
    write_tiny_lora(folder, params, 4, 8, "peft-folder", components=("text_encoder",), alpha=8.0)
    data, config = peft_folder(folder)
    for shapes, fit in ((layers, "both"), (widened(widened(layers, "text_encoder"), "text_encoder_2"), "neither")):
        with pytest.raises(LoraError) as error:
            read_adapter("te", data, shapes, config)
        assert str(error.value) == (
            "LoRA 'te': tensor 'base_model.model.text_model.encoder.layers.0.mlp.fc1.lora_A.weight' is PEFT's name of "
            "a CLIP text encoder's layer (`base_model.model.text_model.*`), and the file's layers and shapes fit "
            f"{fit} of this model's text encoders (text_encoder, text_encoder_2): a text encoder's PEFT file is read "
            "only where they tell which; save it with diffusers' `text_encoder.`/`text_encoder_2.` names "
            "(`save_lora_weights`)"
        )
