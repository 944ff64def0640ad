"""The Makefile's promises, read from make's own dry run: `make demo` installs the runtime alone (the gateway and
the worker, no test tools, no browser), and `make test` installs the developer's tools on top."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.deployfiles import ROOT


def dry_run(target: str, venv: Path) -> str:
    """The commands `make TARGET` would run for a checkout with no virtualenv at `venv` yet."""
    make = shutil.which("make")
    if make is None:
        pytest.fail("make is not installed")
    done = subprocess.run(
        [make, "-n", target, f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    )
    return done.stdout


def test_demo_installs_the_runtime_alone(tmp_path: Path) -> None:
    commands = dry_run("demo", tmp_path / "venv")
    assert '-e ".[worker]"' in commands
    assert ".[dev]" not in commands
    assert "chromium" not in commands and "redis-sentinel" not in commands
    assert "sdxl-serve up" in commands


def test_test_installs_the_developers_tools_on_the_runtime(tmp_path: Path) -> None:
    commands = dry_run("test", tmp_path / "venv")
    assert commands.index('-e ".[worker]"') < commands.index('-e ".[dev]"')
    assert "chromium" in commands and "redis-sentinel" in commands
