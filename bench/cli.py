"""`sdxl-serve bench BENCHMARK ...`: each benchmark is a module of this package with `add_arguments(parser)`
and `main(args) -> int`. Imported only when `sdxl-serve bench` runs."""

from __future__ import annotations

import argparse
import importlib

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
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """A sub-subcommand per benchmark, with that benchmark's own flags."""
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, help_text in BENCHMARKS.items():
        module = importlib.import_module(f"bench.{name}")
        module.add_arguments(sub.add_parser(name, help=help_text, allow_abbrev=False))


def run(args: argparse.Namespace) -> int:
    """Run the benchmark named on the command line."""
    return int(importlib.import_module(f"bench.{args.benchmark}").main(args))
