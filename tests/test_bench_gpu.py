"""bench/gpu.sh, run here up to the GPU: a folder of stand-in wheels for every pin, this test's own interpreter as
the image's (it is in a venv, as the GPU images' python3 is), and a recorder in place of `sdxl-serve`.

What it proves: the environment is made afresh over the image's packages (jax comes from the image), the wheels
are installed from the folder alone (no index, no dependencies resolved, pip run from its own wheel), they shadow
the image's own copies, and the benchmark runs inside that environment, one process per variant with the hub
offline and a shared compile cache, with exactly the flags that `sdxl-serve bench generate` accepts; a variant that
fails loses only itself, and a second run does only what the first did not finish. And `bench generate` itself
runs on the tiny model without the packages a bare GPU image lacks.
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
COMMON_FLAGS = "bench generate --model sdxl-random --size 1024x1024 --steps 20 --json".split()
VARIANTS = [
    ["--images", images, "--attention", attention, progress]
    for images in ("1", "4")
    for attention in ("einsum", "dot_product")
    for progress in ("--progress", "--no-progress")
] + [["--engine-rows", rows, "--attention", "einsum", "--progress"] for rows in ("1", "2", "4", "8")]
# The LoRA benchmark, last, in a process of its own (OUT/lora.jsonl).
LORA_COMMAND = (
    "bench lora --model sdxl-random --size 1024x1024 --ranks 8,32,128 --steps 5 --rows-per-device 2 --rounds 2 --json"
).split()
# The host's dispatch time, first (seconds), in a process of its own (OUT/dispatch.jsonl).
DISPATCH_COMMAND = "bench dispatch --calls 200 --rounds 3 --json".split()
# Appends what the benchmark would see to RECORDED, and prints one JSON line as `bench generate --json` does; fails
# for the variants FAIL names (words that must all be in its argv).
RECORDER = """
import importlib.util, json, os, sys
import diffusers, transformers
seen = {
    "argv": sys.argv[1:],
    "prefix": sys.prefix,
    "diffusers": [diffusers.__version__, diffusers.STAND_IN],
    "transformers": [transformers.__version__, transformers.STAND_IN],
    "jax_origin": importlib.util.find_spec("jax").origin,
    "env": {name: os.environ.get(name) for name in ("HF_HUB_OFFLINE", "JAX_COMPILATION_CACHE_DIR")},
}
with open(os.environ["RECORDED"], "a") as f:
    f.write(json.dumps(seen) + "\\n")
if os.environ.get("FAIL") and set(os.environ["FAIL"].split()) <= set(sys.argv):
    sys.exit("refused")
print(json.dumps({"measurement": "generate", "argv": sys.argv[1:]}))
"""
# What a bare GPU image lacks and no wheel brings (bench/gpu-wheels.txt).
ABSENT_ON_THE_IMAGE = ("obstore", "aiohttp", "prometheus_client")


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


def pip_wheel(folder: Path, version: str) -> Path:
    """A wheel-named zip of this interpreter's own pip, which runs as `python pip-*.whl/pip` as the real one does."""
    import pip

    path = folder / f"pip-{version}-py3-none-any.whl"
    package = Path(pip.__file__).parent
    with zipfile.ZipFile(path, "w") as wheel:
        for file in package.rglob("*"):
            if file.is_file() and "__pycache__" not in file.parts:
                wheel.write(file, Path("pip") / file.relative_to(package))
    return path


@pytest.fixture
def wheels(tmp_path: Path) -> Path:
    folder = tmp_path / "wheels"
    folder.mkdir()
    versions = pins()
    pip_wheel(folder, versions.pop("pip"))
    for distribution, version in {**versions, "sdxl-serve": "0.1.0"}.items():
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
        timeout=300,
        check=False,
    )


def recorded_run(wheels: Path, tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], list[Any]]:
    """The script with the recorder in place of `sdxl-serve`; what each variant's process saw, in order."""
    recorded, recorder = tmp_path / "recorded.jsonl", tmp_path / "recorder.py"
    recorder.write_text(RECORDER)
    recorded.unlink(missing_ok=True)
    env = {"SDXL_GPU_BENCH_CMD": f"python {recorder}", "RECORDED": str(recorded)} | env
    done = run_script("--wheels", wheels, "--out", tmp_path / "out", env=env)
    lines = recorded.read_text().splitlines() if recorded.exists() else []
    return done, [json.loads(line) for line in lines]


def test_installs_offline_over_the_image_and_runs_each_variant_in_its_venv(wheels: Path, tmp_path: Path) -> None:
    done, seen = recorded_run(wheels, tmp_path)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    venv = out / "venv"
    assert "include-system-site-packages = true" in (venv / "pyvenv.cfg").read_text()
    expected = [DISPATCH_COMMAND] + [COMMON_FLAGS + flags for flags in VARIANTS] + [LORA_COMMAND]
    assert [variant["argv"] for variant in seen] == expected
    for variant in seen:
        assert Path(variant["prefix"]) == venv  # `python` on PATH was the new environment's
        # The stand-ins won over the real diffusers and transformers of the interpreter the venv was made from...
        assert variant["diffusers"] == ["0.39.0", True] and variant["transformers"] == ["4.57.6", True]
        # ...and jax still came from that interpreter's packages.
        assert Path(variant["jax_origin"]).is_relative_to(Path(sys.prefix))
        assert variant["env"] == {"HF_HUB_OFFLINE": "1", "JAX_COMPILATION_CACHE_DIR": str(out / "compile-cache")}
    results = [json.loads(line) for line in (out / "generate.jsonl").read_text().splitlines()]
    assert sorted(result["argv"] for result in results) == sorted(COMMON_FLAGS + flags for flags in VARIANTS)
    for name, command in (("lora", LORA_COMMAND), ("dispatch", DISPATCH_COMMAND)):
        assert [json.loads(line)["argv"] for line in (out / f"{name}.jsonl").read_text().splitlines()] == [command]
    versions = (out / "versions.txt").read_text()
    assert "diffusers 0.39.0 (this venv)" in versions and re.search(r"^jax \S+ \(the image\)$", versions, re.M)
    # The wheel's, not the checkout's metadata beside the current directory (an editable install's egg-info).
    assert "sdxl-serve 0.1.0 (this venv)" in versions, versions


def test_a_failed_variant_loses_only_itself_and_a_rerun_does_only_what_is_missing(wheels: Path, tmp_path: Path) -> None:
    refused = ["--images", "4", "--attention", "dot_product", "--no-progress"]
    done, seen = recorded_run(wheels, tmp_path, FAIL="4 dot_product --no-progress")
    assert done.returncode != 0 and "images-4-dot_product-no-progress failed" in done.stderr
    assert len(seen) == len(VARIANTS) + 2  # the variants after the refused one ran too, and dispatch and LoRA
    results = (tmp_path / "out" / "generate.jsonl").read_text().splitlines()
    assert len(results) == len(VARIANTS) - 1
    done, seen = recorded_run(wheels, tmp_path)
    assert done.returncode == 0, done.stderr
    assert [variant["argv"] for variant in seen] == [COMMON_FLAGS + refused]
    assert len((tmp_path / "out" / "generate.jsonl").read_text().splitlines()) == len(VARIANTS)


def test_the_benchmark_commands_are_ones_that_bench_generate_accepts(wheels: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = run_script("--wheels", wheels, "--out", out, "--dry-run", "--", "--repeats", "5")
    assert done.returncode == 0, done.stderr
    assert not (out / "generate.jsonl").exists()
    dispatch, *commands, lora = [shlex.split(line) for line in (out / "command.txt").read_text().splitlines()]
    assert commands == [["sdxl-serve", *COMMON_FLAGS, *flags, "--repeats", "5"] for flags in VARIANTS]
    assert (dispatch, lora) == (["sdxl-serve", *DISPATCH_COMMAND], ["sdxl-serve", *LORA_COMMAND])
    parsed = build_parser(load={"bench"}).parse_args(dispatch[1:])
    assert (parsed.calls, parsed.rounds, parsed.json) == (200, 3, True)
    parsed = build_parser(load={"bench"}).parse_args(lora[1:])
    assert (parsed.model, parsed.size, parsed.ranks, parsed.rounds, parsed.json) == (
        "sdxl-random",
        "1024x1024",
        "8,32,128",
        2,
        True,
    )
    for command in commands:
        args = build_parser(load={"bench"}).parse_args(command[1:])
        (config,) = configs_from_args(args)
        assert (config.model, config.size, config.steps, config.repeats) == ("sdxl-random", (1024, 1024), 20, 5)
        count = int(command[-6])
        assert (config.attentions, config.progress) == ((command[-4],), command[-3] == "--progress")
        if command[-7] == "--engine-rows":
            assert config.engine_rows == count
        else:
            assert (config.images, config.engine_rows) == (count, None)
        assert args.json


# Imported first by the child: any import of a package a bare GPU image lacks fails as it would there.
IMPORT_BLOCKER = """
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {absent!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (absent on a bare GPU image)", name=name)
sys.meta_path.insert(0, Absent())
sys.argv[0] = "sdxl-serve"
from sdxl_serve.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("batch", "measurement", "images"),
    [(["--images", "4"], "generate", 4), (["--engine-rows", "2"], "engine", 8)],
    ids=["pipeline", "engine"],
)
def test_bench_generate_runs_without_what_a_bare_gpu_image_lacks(
    tiny_model: Path, batch: list[str], measurement: str, images: int
) -> None:
    """The pipeline, and the engine at 2 rows per device on 4 CPU devices (one request of 8 images a call)."""
    program = IMPORT_BLOCKER.format(absent=set(ABSENT_ON_THE_IMAGE))
    flags = ["--model", str(tiny_model), "--size", "64x64", "--steps", "1", *batch, "--repeats", "1"]
    argv = [sys.executable, "-c", program, "bench", "generate", *flags, "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    (report,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert (report["measurement"], report["images"]) == (measurement, images)


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


SIMULATE = "SDXL_SERVE_GPU_SIMULATE"
# The packages of a bare GPU image, less CUDA: everything else comes from the wheels folder.
BARE_IMAGE = ("jax==0.11.2", "flax", "transformers>=5,<6")


def bare_image(folder: Path) -> Path:
    """A Python 3.12 environment with only jax, flax and transformers 5 and their dependencies, and no pip."""
    python = subprocess.run([str(ROOT / ".ci" / "python312")], capture_output=True, text=True, check=True).stdout
    subprocess.run([python.strip(), "-m", "venv", str(folder)], check=True)
    subprocess.run([str(folder / "bin" / "pip"), "install", "--quiet", *BARE_IMAGE], check=True, timeout=1800)
    subprocess.run([str(folder / "bin" / "pip"), "uninstall", "--yes", "--quiet", "pip"], check=True)
    return folder / "bin" / "python"


@pytest.mark.e2e
def test_bench_lora_runs_without_what_a_bare_gpu_image_lacks(tiny_model: Path) -> None:
    program = IMPORT_BLOCKER.format(absent=set(ABSENT_ON_THE_IMAGE))
    flags = ["--model", str(tiny_model), "--size", "64x64", "--steps", "1", "--rounds", "1", "--ranks", "2"]
    argv = [sys.executable, "-c", program, "bench", "lora", *flags, "--rows-per-device", "1", "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert set(json.loads(done.stdout)["ranks"]) == {"2"}


def test_bench_dispatch_runs_without_what_a_bare_gpu_image_lacks() -> None:
    program = IMPORT_BLOCKER.format(absent=set(ABSENT_ON_THE_IMAGE))
    argv = [sys.executable, "-c", program, "bench", "dispatch", "--calls", "2", "--rounds", "1", "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert (report["measurement"], report["arrays"]) == ("dispatch", 1680)


@pytest.mark.skipif(os.environ.get(SIMULATE) != "1", reason=f"minutes and a package index: {SIMULATE}=1 runs it")
@pytest.mark.timeout(7200)
def test_the_script_runs_end_to_end_on_a_bare_image_rebuilt_on_the_cpu(tiny_model: Path, tmp_path: Path) -> None:
    """The whole script on the CPU, as on a GPU machine: the image's environment rebuilt with Python 3.12, the
    real wheels (bench/gpu-wheels.sh, from this checkout's last commit), every variant on the tiny model, then on
    `sdxl-random`, at 64x64 and one step."""
    python = bare_image(tmp_path / "image")
    wheels = tmp_path / "wheels"
    subprocess.run(["bash", str(ROOT / "bench" / "gpu-wheels.sh"), str(wheels)], check=True, timeout=1800)
    # bench generate makes its own CPU devices from its flag; the suite's XLA_FLAGS would override it.
    env = {name: value for name, value in os.environ.items() if name != "XLA_FLAGS"}
    # One CPU device, as one GPU: a single image cannot be split over several.
    small = ["--size", "64x64", "--steps", "1", "--repeats", "1", "--cpu-devices", "1"]
    for name, model in (("tiny", ["--model", str(tiny_model)]), ("random", [])):
        out = tmp_path / name
        argv = ["bash", str(SCRIPT), "--python", str(python), "--wheels", str(wheels), "--out", str(out)]
        lora = " ".join(
            [*model, "--size", "64x64", "--steps", "1", "--rounds", "1", "--ranks", "2", "--cpu-devices", "1"]
        )
        dispatch = "--calls 5 --rounds 1 --cpu-devices 1"
        simulated = [*argv, "--simulate", "--lora-flags", lora, "--dispatch-flags", dispatch, "--", *model, *small]
        done = subprocess.run(simulated, env=env, check=False, timeout=3600)
        assert done.returncode == 0, name
        reports = [json.loads(line) for line in (out / "generate.jsonl").read_text().splitlines()]
        assert len(reports) == len(VARIANTS)
        made = {(report["measurement"], report["images"]) for report in reports}
        # The pipeline's 1 and 4 images; the engine's full batch at R rows per device, on one device.
        assert made == {("generate", 1), ("generate", 4), *(("engine", rows) for rows in (1, 2, 4, 8))}
        (lora_report,) = [json.loads(line) for line in (out / "lora.jsonl").read_text().splitlines()]
        assert set(lora_report["ranks"]) == {"2"}
        (dispatch_report,) = [json.loads(line) for line in (out / "dispatch.jsonl").read_text().splitlines()]
        assert dispatch_report["measurement"] == "dispatch"
