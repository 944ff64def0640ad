"""`bench generate`, the FLOP counter and the sdxl-random architecture.

Full-size SDXL is only ever abstract here (`jax.eval_shape`, lowering on `ShapeDtypeStruct`s): its
parameter counts and FLOPs are checked against SDXL base's published figures, which checks the written
configs and the counter together. Random weights are made on the devices for a reduced architecture only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import FlaxStableDiffusionXLPipeline

from bench.generate import GenerateConfig, parse_size, summarize
from common.config import ConfigError
from common.protocol import GenerationParams, Shape
from sdxl_serve.cli import main as cli_main
from worker.flops import FlopCount, count_flops, peak_tflops
from worker.pipeline import PipelineOptions, SDXLPipeline
from worker.sdxl_arch import Architecture, abstract_params, components, parameter_count

TERA = 1e12


@pytest.fixture(scope="module")
def sdxl() -> tuple[Any, dict[str, Any]]:
    """SDXL base's pipeline object and its parameters as shapes only: nothing full-size is allocated."""
    parts = components()
    return FlaxStableDiffusionXLPipeline(**parts), abstract_params(parts)


@pytest.mark.arch
def test_sdxl_random_has_sdxl_base_parameter_counts(sdxl: tuple[Any, dict[str, Any]]) -> None:
    _, params = sdxl
    published = {"unet": 2.567e9, "vae": 83.7e6, "text_encoder": 123.1e6, "text_encoder_2": 694.7e6}
    counts = {name: parameter_count(params[name]) for name in published}
    assert counts == pytest.approx(published, rel=1e-3)


@pytest.fixture(scope="module")
def flops_1024(sdxl: tuple[Any, dict[str, Any]]) -> FlopCount:
    pipe, params = sdxl
    return count_flops(pipe, params, Shape(width=1024, height=1024, steps=20))


@pytest.mark.arch
def test_flops_per_image_match_the_published_count(flops_1024: FlopCount) -> None:
    # The published figures: UNet 6.76 TFLOP per sample per step, twice per step (guidance), VAE decode
    # 10.5, text encoders 0.1: about 281 TFLOP per 1024x1024 image at 20 steps.
    assert flops_1024.unet_per_sample / TERA == pytest.approx(6.76, rel=0.02)
    assert flops_1024.vae_decode / TERA == pytest.approx(10.5, rel=0.02)
    assert 0.05 < flops_1024.text_encoders / TERA < 0.2
    assert flops_1024.per_image / TERA == pytest.approx(281, rel=0.02)


@pytest.mark.arch
def test_flop_count_follows_the_shape(sdxl: tuple[Any, dict[str, Any]], flops_1024: FlopCount) -> None:
    pipe, params = sdxl
    small = count_flops(pipe, params, Shape(width=512, height=512, steps=30))
    # A quarter of the pixels: convolutions cost a quarter, attention over tokens less than that.
    assert 0.2 < small.unet_per_sample / flops_1024.unet_per_sample < 0.3
    assert small.vae_decode / flops_1024.vae_decode == pytest.approx(0.25, rel=0.05)
    assert small.text_encoders == flops_1024.text_encoders
    assert small.unet_per_image == 60 * small.unet_per_sample


@pytest.mark.parametrize(
    ("kind", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("TPU v5 lite", 197.0),
        ("TPU v5", 459.0),
        ("TPU v6 lite", 918.0),
        ("cpu", None),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_peak_is_looked_up_by_device_kind_and_never_guessed(kind: str, peak: float | None) -> None:
    assert peak_tflops(kind) == peak


def test_summary_of_latencies() -> None:
    report = summarize([2.0, 1.0, 3.0, 2.0, 2.0], flop_per_image=100e12, images=4, devices=2, peak_tflops=200.0)
    assert report["latency_p50_s"] == 2.0 and report["latency_p90_s"] == 3.0 and report["latency_min_s"] == 1.0
    assert report["images_per_s"] == 2.0 and report["s_per_image_per_device"] == 1.0
    assert report["achieved_tflops"] == 200.0 and report["achieved_tflops_per_device"] == 100.0
    assert report["peak_fraction"] == 0.5 and report["floor_s_per_image"] == 0.5 and report["x_floor"] == 2.0
    unknown = summarize([2.0], flop_per_image=100e12, images=4, devices=2, peak_tflops=None)
    assert not {"peak_fraction", "floor_s_per_image", "x_floor"} & set(unknown)


def test_arguments_are_checked() -> None:
    assert parse_size("1024x768") == (1024, 768)
    for bad in ("1024", "x768", "0x8", "axb"):
        with pytest.raises(argparse.ArgumentTypeError, match="WIDTHxHEIGHT"):
            parse_size(bad)
    good: dict[str, Any] = {
        "model": "m",
        "revision": None,
        "size": None,
        "steps": 2,
        "images": 4,
        "repeats": 1,
        "attentions": ("einsum",),
        "progress": True,
        "peak_tflops": None,
    }
    GenerateConfig(**good)
    changes: list[tuple[dict[str, Any], str]] = [
        ({"steps": 0}, "--steps"),
        ({"attentions": ("flash",)}, "--attention"),
        ({"attentions": ("einsum", "einsum")}, "--attention"),
        ({"peak_tflops": 0.0}, "--peak"),
    ]
    for change, flag in changes:
        with pytest.raises(ConfigError, match=flag):
            GenerateConfig(**good | change)


# SDXL's component layout at a size a CPU runs in seconds: the same classes as `sdxl-random`.
SMALL_TEXT = {
    "vocab_size": 600,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "projection_dim": 32,
}
SMALL = Architecture(
    unet={
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "attention_head_dim": (2, 4),
        "transformer_layers_per_block": (1, 1),
        "cross_attention_dim": 64,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 6 * 8 + 32,
    },
    vae={
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": (32, 32),
        "down_block_types": ("DownEncoderBlock2D",) * 2,
        "up_block_types": ("UpDecoderBlock2D",) * 2,
        "sample_size": 32,
        "scaling_factor": 0.13025,
    },
    text_encoder=SMALL_TEXT,
    text_encoder_2=SMALL_TEXT,
)


@pytest.mark.arch
def test_random_weights_are_made_on_every_device_in_bfloat16() -> None:
    pipeline = SDXLPipeline.random(SMALL, PipelineOptions(images_per_request=4, report_progress=False))
    leaves = jax.tree_util.tree_leaves(pipeline._params)
    assert leaves and all(w.dtype == jnp.bfloat16 and w.sharding.is_fully_replicated for w in leaves)
    copies = [[shard.data for shard in w.addressable_shards] for w in leaves[:20]]
    assert all(len(c) == 4 and np.array_equal(c[0], c[3]) for c in copies)  # the copies are the same weights
    shape = Shape(width=32, height=32, steps=2)
    assert pipeline.native_size == (32, 32)
    pipeline.compile(shape.size)
    images = pipeline.generate(GenerationParams(prompt="a cat", guidance_scale=7.5).resolved(shape, seed=0))
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
    assert pipeline.flop_count(shape).per_image > 0


@pytest.mark.compile
def test_bench_generate_on_the_tiny_model(tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = cli_main(
        [
            "bench",
            "generate",
            "--model",
            str(tiny_model),
            "--steps",
            "2",
            "--repeats",
            "2",
            "--attention",
            "einsum,dot_product",
            "--no-progress",
            "--json",
        ]
    )
    assert status == 0
    reports = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["attention"] for r in reports] == ["einsum", "dot_product"]
    assert [r["attention_impl"] for r in reports] == ["einsum", "dot_product:xla"]
    for report in reports:
        assert (report["shape"], report["images"], report["devices"], report["progress"]) == ("64x64x2", 4, 4, False)
        assert report["repeats"] == 2 and 0 < report["latency_min_s"] <= report["latency_p50_s"]
        assert report["tflop_per_image"] > 0 and report["achieved_tflops"] > 0
        assert report["compile_s"] > 0 and "peak_fraction" not in report  # no peak is known for a CPU
