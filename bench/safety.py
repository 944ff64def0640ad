"""What the image safety checker costs per image, on this machine's devices.

    .venv/bin/python bench/safety.py [--arch vit-l-14|tiny] [--size 1024] [--batch 4] [--repeats 5]

The checker is built with random weights in memory: `vit-l-14` is the architecture of the published Stable
Diffusion checker (CLIP ViT-L/14 at 224x224, projection 768), `tiny` the test suite's. Its cost does not depend
on the weights. Reported: compile seconds, then the median over the repeats of one batch's check (resize on the
device included) and its share per image.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.host import describe

# The published checker's CLIP (openai/clip-vit-large-patch14's vision tower); the text side is never built.
VIT_L_14 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
}
TINY = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 2}
TINY |= {"image_size": 32, "patch_size": 8}


def build(arch: str) -> object:
    import jax
    import jax.numpy as jnp
    from transformers import CLIPConfig

    from worker.safety import SafetyChecker, checker_module

    vision = VIT_L_14 if arch == "vit-l-14" else TINY
    config = CLIPConfig(vision_config=vision, projection_dim=768 if arch == "vit-l-14" else 16)
    module = checker_module(config)
    size = vision["image_size"]
    params = jax.jit(lambda key: module.init(key, jnp.zeros((1, size, size, 3))))(jax.random.key(0))["params"]
    return SafetyChecker(module, params, size)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", choices=["vit-l-14", "tiny"], default="vit-l-14")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import jax

    from common.protocol import Size

    checker = build(args.arch)
    started = time.perf_counter()
    checker.compile(Size(width=args.size, height=args.size), args.batch)  # type: ignore[attr-defined]
    compile_s = time.perf_counter() - started
    pixels = np.random.default_rng(0).integers(0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8)
    times = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        checker.check(pixels)  # type: ignore[attr-defined]
        times.append((time.perf_counter() - started) * 1000)
    batch_ms = statistics.median(times)
    print(f"machine: {describe()}; devices: {jax.devices()[0].device_kind} x{jax.device_count()}")
    print(f"checker {args.arch}, batch {args.batch} of {args.size}x{args.size}: compile {compile_s:.1f} s, "
          f"check p50 {batch_ms:.1f} ms per batch, {batch_ms / args.batch:.1f} ms per image")  # fmt: skip


if __name__ == "__main__":
    main()
