"""bench/gpu.sh, run here up to the GPU: a folder of stand-in wheels for every pin, this test's own interpreter as
the image's (it is in a venv, as the GPU images' python3 is), and a recorder in place of `sdxl-serve`.

What it proves: the environment is made afresh over the image's packages (jax comes from the image), the wheels
are installed from the folder alone (no index, no dependencies resolved), they shadow the image's own copies, and
the benchmark runs inside that environment with exactly the flags that `sdxl-serve bench generate` accepts.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from bench.generate import configs_from_args
from sdxl_serve.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu.sh"
EXPECTED_FLAGS = (
    "bench generate --model sdxl-random --size 1024x1024 --steps 20 --images 1,4 --attention einsum,dot_product --json"
).split()
# Prints what the benchmark would see, and one JSON line as `bench generate --json` does.
RECORDER = """
import importlib.util, json, os, sys
import diffusers, transformers
seen = {
    "argv": sys.argv[1:],
    "prefix": sys.prefix,
    "diffusers": [diffusers.__version__, diffusers.STAND_IN],
    "transformers": [transformers.__version__, transformers.STAND_IN],
    "jax_origin": importlib.util.find_spec("jax").origin,
}
with open(os.environ["RECORDED"], "w") as f:
    json.dump(seen, f)
print(json.dumps({"measurement": "generate", "images": 1}))
"""


def pins() -> dict[str, str]:
    """bench/gpu-wheels.txt as {distribution: version}."""
    lines = (line.partition("#")[0].strip() for line in (ROOT / "bench" / "gpu-wheels.txt").read_text().splitlines())
    return dict(line.split("==") for line in lines if line)


def stand_in_wheel(folder: Path, distribution: str, version: str) -> Path:
    """A wheel with the name and version of `distribution` whose module only says it is a stand-in. It requires a
    package that exists nowhere: installing it with its dependencies resolved would fail."""
    name = distribution.replace("-", "_")
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"__version__ = {version!r}\nSTAND_IN = True\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n"
        "Requires-Dist: no-such-package-anywhere\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as wheel:
        for member, content in files.items():
            wheel.writestr(member, content)
    return path


@pytest.fixture
def wheels(tmp_path: Path) -> Path:
    folder = tmp_path / "wheels"
    folder.mkdir()
    for distribution, version in {**pins(), "sdxl-serve": "0.1.0"}.items():
        stand_in_wheel(folder, distribution, version)
    return folder


def run_script(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # An index that answers nothing: the install must not need one.
    environment = os.environ | {"PIP_INDEX_URL": "http://127.0.0.1:9/simple"} | (env or {})
    return subprocess.run(
        ["bash", str(SCRIPT), "--python", sys.executable, *map(str, args)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_installs_offline_over_the_image_and_runs_the_benchmark_in_its_venv(wheels: Path, tmp_path: Path) -> None:
    out, recorded = tmp_path / "out", tmp_path / "recorded.json"
    recorder = tmp_path / "recorder.py"
    recorder.write_text(RECORDER)
    env = {"SDXL_GPU_BENCH_CMD": f"python {recorder}", "RECORDED": str(recorded)}
    done = run_script("--wheels", wheels, "--out", out, env=env)
    assert done.returncode == 0, done.stderr
    venv = out / "venv"
    assert "include-system-site-packages = true" in (venv / "pyvenv.cfg").read_text()
    seen: dict[str, Any] = json.loads(recorded.read_text())
    assert seen["argv"] == EXPECTED_FLAGS
    assert Path(seen["prefix"]) == venv  # `python` on PATH was the new environment's
    # The stand-ins won over the real diffusers and transformers of the interpreter the venv was made from...
    assert seen["diffusers"] == ["0.39.0", True] and seen["transformers"] == ["4.57.6", True]
    # ...and jax still came from that interpreter's packages.
    assert Path(seen["jax_origin"]).is_relative_to(Path(sys.prefix))
    assert json.loads((out / "generate.jsonl").read_text()) == {"measurement": "generate", "images": 1}
    versions = (out / "versions.txt").read_text()
    assert "diffusers 0.39.0 (this venv)" in versions and re.search(r"^jax \S+ \(the image\)$", versions, re.M)


def test_the_benchmark_command_is_one_that_bench_generate_accepts(wheels: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = run_script("--wheels", wheels, "--out", out, "--dry-run", "--", "--repeats", "5")
    assert done.returncode == 0, done.stderr
    assert not (out / "generate.jsonl").exists()
    command = shlex.split((out / "command.txt").read_text())
    assert command == ["sdxl-serve", *EXPECTED_FLAGS, "--repeats", "5"]
    args = build_parser(load={"bench"}).parse_args(command[1:])
    configs = configs_from_args(args)
    assert [c.images for c in configs] == [1, 4] and {c.repeats for c in configs} == {5}
    assert {(c.model, c.size, c.steps, c.attentions) for c in configs} == {
        ("sdxl-random", (1024, 1024), 20, ("einsum", "dot_product"))
    }
    assert args.json


@pytest.mark.parametrize("missing", ["diffusers", "transformers", "sdxl_serve"])
def test_a_missing_wheel_fails_before_anything_is_made(wheels: Path, tmp_path: Path, missing: str) -> None:
    for wheel in wheels.glob(f"{missing}-*.whl"):
        wheel.unlink()
    out = tmp_path / "out"
    done = run_script("--wheels", wheels, "--out", out, "--dry-run")
    assert done.returncode == 2
    assert missing in done.stderr and "must hold one" in done.stderr
    assert not (out / "venv").exists()


def test_a_wrong_version_is_refused(wheels: Path, tmp_path: Path) -> None:
    (wheels / "huggingface_hub-0.36.2-py3-none-any.whl").unlink()
    stand_in_wheel(wheels, "huggingface-hub", "1.3.0")
    done = run_script("--wheels", wheels, "--out", tmp_path / "out", "--dry-run")
    assert done.returncode == 2 and "huggingface-hub==0.36.2" in done.stderr
