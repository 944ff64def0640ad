"""`sdxl-serve tiny-lora OUT.safetensors --model DIR`: write a small random LoRA for a model (the tiny one), in
kohya's, diffusers' or PEFT's format (`peft-folder`: OUT is PEFT's `save_pretrained` folder), to try adapters without
downloading one."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.config import ConfigError

# worker/tiny_lora.py's, named here so that `--help` needs no JAX.
FORMATS = ("kohya", "kohya-metadata", "peft", "diffusers", "peft-folder")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The file to write, the model it is for, and the adapter's rank, format and seed."""
    parser.add_argument("out", type=Path, metavar="OUT.safetensors")
    parser.add_argument("--model", type=Path, required=True, help="the model's folder (`sdxl-serve tiny-model DIR`)")
    parser.add_argument("--rank", type=_positive, default=4)
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="kohya",
        help="kohya: sd-scripts' names (the UNet's original ones), an alpha tensor per layer; kohya-metadata: the "
        "alpha in the header's ss_network_alpha; peft: diffusers/PEFT names; diffusers: the alpha in the header's "
        "lora_adapter_metadata; peft-folder: PEFT's save_pretrained folder (the UNet's layers, adapter_config.json)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alpha", type=float, default=None, help="the file's alpha (kohya's default: the rank)")
    parser.add_argument("--conv", action="store_true", help="LoCon: the UNet's convolutions too")


def run(args: argparse.Namespace) -> int:
    """Write the adapter and print where."""
    if not (args.model / "model_index.json").is_file():
        raise ConfigError(f"--model {args.model}: no model there (write one with `sdxl-serve tiny-model DIR`)")
    from worker.cli import use_cpu_devices

    use_cpu_devices(1)  # before JAX is imported: reading the model's shapes needs no accelerator
    from worker.tiny_formats import flax_params
    from worker.tiny_lora import write_tiny_lora

    unet_config = json.loads((args.model / "unet" / "config.json").read_text())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    updates = write_tiny_lora(
        args.out,
        flax_params(args.model),
        args.rank,
        args.seed,
        args.format,
        unet_config=unet_config,
        alpha=args.alpha,
        convolutions=args.conv,
    )
    print(f"{len(updates)} layers, rank {args.rank}, {args.format}", file=sys.stderr)
    print(args.out)
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: a rank is a whole number of 1 or more")
    return value
