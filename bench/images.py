"""Requests that start from an image: `sdxl-serve bench images --model DIR [--size 64x64] [--steps 20] [--json]`.

In-process, on the local devices, the row engine at one size. Two figures:

- the VAE encoder's cost per image (worker/vae_encoder.py): the median seconds of encoding one image on every device
  at once, per image;
- a lone request's latency (admit to its images, one at a time on an idle engine), `n` images, for text to image,
  image to image at strength 0.3 and 0.8, and inpainting at 0.9999 (diffusers' default), the kinds taking turns in
  each of `--rounds` rounds (rotated), so that a shared machine's drift reaches them alike. Image to image at
  strength s runs `int(steps * s)` of the steps, plus the encode.

Prints a markdown table, or one JSON object with `--json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import numpy as np

from bench.host import describe, size_flag
from common.protocol import DEFAULT_INPAINT_STRENGTH, GenerationParams, ResolvedParams, Shape, Size

# kind -> (strength, inpainting); None: text to image
KINDS: dict[str, tuple[float, bool] | None] = {
    "text to image": None,
    "image to image 0.3": (0.3, False),
    "image to image 0.8": (0.8, False),
    "inpainting": (DEFAULT_INPAINT_STRENGTH, True),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local diffusers directory (the tiny model) or sdxl-random")
    parser.add_argument("--size", default="64x64", help="WIDTHxHEIGHT (default 64x64, the tiny model's)")
    parser.add_argument("--steps", type=int, default=20, help="steps a request asks for (default 20)")
    parser.add_argument("--n", type=int, default=1, help="images per request (default 1)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds in which the kinds take turns (default 5)")
    parser.add_argument(
        "--cpu-devices", type=int, default=4, help="virtual devices JAX makes of the CPU when there is no accelerator"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def picture(size: Size) -> np.ndarray:
    """A smooth test picture (gradients), uint8 [height, width, 3]."""
    y, x = np.mgrid[0 : size.height, 0 : size.width]
    return np.stack([x * 255 // max(1, size.width - 1), y * 255 // max(1, size.height - 1), (x + y) % 256], -1).astype(
        np.uint8
    )


def image_input(kind: str, size: Size) -> Any:
    """The engine's ImageInput for `kind`, None for text to image; inpainting repaints the middle half."""
    from worker.pipeline_protocol import ImageInput

    spec = KINDS[kind]
    if spec is None:
        return None
    strength, inpainting = spec
    mask = None
    if inpainting:
        mask = np.zeros((size.height, size.width), bool)
        mask[size.height // 4 : 3 * size.height // 4, size.width // 4 : 3 * size.width // 4] = True
    return ImageInput(picture(size), mask, strength)


def latency(engine: Any, params: ResolvedParams, image: Any) -> float:
    """Seconds from admit to the request's images, alone on the engine."""
    started = time.perf_counter()
    engine.admit("bench", params, lambda step: None, image=image)
    while engine.busy:
        tick = engine.step()
        if tick.stopped or tick.failed:
            raise RuntimeError(f"a benchmark request ended badly: {tick.stopped or tick.failed}")
    return time.perf_counter() - started


def encode_seconds(encoder: Any, size: Size, devices: int, repeats: int) -> float:
    """The median seconds per image of encoding one image on each device."""
    from common.input_images import to_model_input

    pixels = [to_model_input(picture(size))] * devices
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        np.asarray(encoder.encode_wave(pixels, size))
        times.append((time.perf_counter() - started) / devices)
    return statistics.median(times)


def measure(model: str, size: Size, steps: int, n: int, rounds: int) -> dict[str, Any]:
    """Median latency per kind, and the encoder's seconds per image."""
    import jax

    from worker.engine import RowEngine
    from worker.pipeline import PipelineOptions, SDXLPipeline

    devices = jax.local_device_count()
    pipeline = SDXLPipeline.load(model, None, PipelineOptions(images_per_request=devices, max_steps=steps))
    engine = RowEngine(pipeline, max(1, -(-n // devices)))
    engine.compile(size)
    params = GenerationParams(prompt="a lighthouse", n=n).resolved(
        Shape(width=size.width, height=size.height, steps=steps), 0
    )
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    kinds = list(KINDS)
    for turn in range(rounds):
        for kind in kinds[turn % len(kinds) :] + kinds[: turn % len(kinds)]:
            times[kind].append(latency(engine, params, image_input(kind, size)))
    medians = {kind: statistics.median(values) for kind, values in times.items()}
    return {
        "latency_s": medians,
        "encode_s_per_image": encode_seconds(engine._starts.encoder, size, devices, max(3, rounds)),
        "devices": devices,
    }


def markdown(report: dict[str, Any]) -> str:
    base = report["latency_s"]["text to image"]
    lines = [
        f"`{report['command']}` on {report['host']}, {report['devices']} devices; VAE encode "
        f"{1000 * report['encode_s_per_image']:.1f} ms per image; a lone request's median latency:",
        "",
        "| request | latency (ms) | against text to image |",
        "|---|---|---|",
    ]
    for kind, seconds in report["latency_s"].items():
        lines.append(f"| {kind} | {1000 * seconds:.1f} | {seconds / base:.2f}x |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    size = size_flag(args.size)
    from worker.cli import use_cpu_devices

    use_cpu_devices(args.cpu_devices)
    report = measure(args.model, size, args.steps, args.n, args.rounds)
    report |= {
        "command": f"sdxl-serve bench images --model {args.model} --size {args.size} --steps {args.steps} "
        f"--n {args.n} --rounds {args.rounds}",
        "host": describe(),
    }
    print(json.dumps(report) if args.json else markdown(report))
    return 0
