"""Imports run one way: `common` loads nothing above it, the gateway and the worker nothing of each other.

Each module is imported alone in a fresh interpreter, and what else got loaded is read from sys.modules.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import pytest

from tests.deployfiles import ROOT

_LOADED = """
import importlib, json, sys
importlib.import_module({module!r})
print(json.dumps(sorted(sys.modules)))
"""


def modules_of(package: str) -> list[str]:
    return [f"{package}.{info.name}" for info in pkgutil.iter_modules([str(ROOT / package)])]


def loaded_by(module: str) -> set[str]:
    """Top-level packages loaded by importing `module` alone."""
    result = subprocess.run(
        [sys.executable, "-c", _LOADED.format(module=module)], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return {name.partition(".")[0] for name in json.loads(result.stdout)}


@pytest.mark.parametrize("module", modules_of("common"))
def test_common_loads_nothing_above_it(module: str) -> None:
    assert not loaded_by(module) & {"gateway", "worker", "sdxl_serve", "bench", "testkit", "tests"}


@pytest.mark.parametrize("module", ["gateway.app", "gateway.cli"])
def test_the_gateway_loads_no_worker_jax_or_benchmark(module: str) -> None:
    assert not loaded_by(module) & {"worker", "jax", "jaxlib", "flax", "diffusers", "sdxl_serve", "bench"}


def test_the_worker_cli_loads_no_gateway_or_jax() -> None:
    """The worker's flags are read before JAX is imported (XLA_FLAGS is read once, at import)."""
    assert not loaded_by("worker.cli") & {"gateway", "jax", "diffusers", "sdxl_serve", "bench"}


def test_the_program_loads_only_the_subcommand_it_runs() -> None:
    code = (
        "import json, sys\n"
        "from sdxl_serve.cli import build_parser\n"
        "build_parser(load=['gateway']).parse_args(['gateway'])\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert not {name.partition(".")[0] for name in json.loads(result.stdout)} & {"worker", "bench", "jax"}
