"""Placeholder: `sdxl-serve bench load` (being written)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare this benchmark's flags."""


def main(args: argparse.Namespace) -> int:
    """Run the benchmark; returns the exit status."""
    raise SystemExit("sdxl-serve bench load: not written yet")
