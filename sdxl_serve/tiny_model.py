"""`sdxl-serve tiny-model DIR`: write the tiny random-weight SDXL model (for tests and demos)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The directory to write, the seed of the random weights, and whether the UNet is an inpainting one."""
    parser.add_argument("directory", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--inpainting", action="store_true", help="a 9-channel inpainting UNet (latents, mask, masked-image latents)"
    )
    parser.add_argument(
        "--if-missing", action="store_true", help="do nothing if DIRECTORY already holds a model (for containers)"
    )


def run(args: argparse.Namespace) -> int:
    """Write the model and print where."""
    if args.if_missing and (args.directory / "model_index.json").is_file():
        print(f"{args.directory}: a model is already there", file=sys.stderr, flush=True)
        return 0
    print(
        f"making the tiny random-weight model at {args.directory} (a minute or two on a CPU)...",
        file=sys.stderr,
        flush=True,
    )
    from worker.cli import use_cpu_devices

    use_cpu_devices(1)  # before JAX is imported: one device is plenty to make random weights
    from worker.tiny_model import write_tiny_model

    print(write_tiny_model(args.directory, seed=args.seed, inpainting=args.inpainting))
    return 0
