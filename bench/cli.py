"""`sdxl-serve bench BENCHMARK ...`: each benchmark is a module of this package with `add_arguments(parser)`
and `main(args) -> int`. Imported only when `sdxl-serve bench` runs, and then only the benchmark named on the
command line: `bench generate` on a GPU image that has no aiohttp must not import the load generators."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from typing import Any

BENCHMARKS = {
    "routing": "simulate the routing policies (shared, random, p2c) under Poisson load",
    "load": "open-loop Poisson load against a running gateway",
    "progress": "cost of per-step progress, and submit-to-first-progress latency",
    "start": "worker start-to-ready with a cold and a warm compilation cache",
    "protect": "refusals per second on one core (429, 400) and gateway memory under a 10x burst",
    "tenants": "a second caller's wait while a first floods, with and without the per-caller cap",
    "generate": "the pipeline in-process: compile time, latency, images/s, TFLOP/s and fraction of peak",
    "nemesis": "a seeded fault schedule against a local cluster, then a check of what every client saw",
    "backtoback": "device idle between back-to-back jobs: the worker loop in-process, jobs queued ahead",
    "webhooks": "job end to webhook arrival (p50, p99) on a local cluster, and deliveries/s of one gateway",
    "engine": "the engine against one request at a time: images/s, latency per class, a lone n=4, compiles",
    "lora": "the engine's step time with LoRA adapters: none, one shared, one per row, per rank (in-process)",
    "images": "requests from an image: VAE encode per image, latency of image to image and inpainting (in-process)",
    "dispatch": "host time per step to pass SDXL's UNet parameters: nested dicts against one flat tuple",
}


class _FlagsOnUse(argparse._SubParsersAction):  # type: ignore[type-arg]
    """Sub-subcommands whose flags are added when one is chosen: its module is imported then, and no other."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        name = values[0] if isinstance(values, list) and values else None
        chosen = self.choices.get(name) if isinstance(name, str) else None
        if chosen is not None and not chosen._actions[1:]:  # only --help so far
            importlib.import_module(f"bench.{name}").add_arguments(chosen)
        super().__call__(parser, namespace, values, option_string)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """A sub-subcommand per benchmark; each gets its own flags when it is the one named."""
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK", action=_FlagsOnUse)
    for name, help_text in BENCHMARKS.items():
        sub.add_parser(name, help=help_text, allow_abbrev=False)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark named on the command line."""
    return int(importlib.import_module(f"bench.{args.benchmark}").main(args))
