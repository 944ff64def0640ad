"""The real SDXL architecture (`sdxl-random`: SDXL base's configs, random bfloat16 weights) compiled and run
by the worker's own pipeline at 256x256, 2 steps, on one CPU device, within 12 GiB of host memory.

It takes many minutes on a small host, so it runs as a CI step of its own: `SDXL_SERVE_FULL_ARCH=1 pytest
tests/test_full_architecture.py`. It needs about 14 GiB free; with less it is skipped, saying so.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import pytest

PEAK_LIMIT_GIB = 12.0
NEEDS_FREE_GIB = 14.0

pytestmark = [
    pytest.mark.skipif(
        os.environ.get("SDXL_SERVE_FULL_ARCH") != "1", reason="a CI step of its own: set SDXL_SERVE_FULL_ARCH=1"
    ),
    pytest.mark.timeout(3600),
    pytest.mark.arch,
]


def available_gib() -> float:
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    return int(fields["MemAvailable"].split()[0]) / 2**20


def test_sdxl_random_compiles_and_runs_at_256_on_one_cpu_device_within_12_gib() -> None:
    if available_gib() < NEEDS_FREE_GIB:
        pytest.skip(f"{available_gib():.1f} GiB available, {NEEDS_FREE_GIB} needed")
    # One CPU device, and the CLI's memory-scheduled XLA:CPU (not the four devices this suite's conftest sets).
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    command = [
        *(sys.executable, "-m", "sdxl_serve", "bench", "generate", "--model", "sdxl-random"),
        *("--size", "256x256", "--steps", "2", "--images", "1", "--cpu-devices", "1", "--repeats", "1", "--json"),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert (report["shape"], report["images"], report["devices"]) == ("256x256x2", 1, 1)
    assert report["latency_p50_s"] > 0 and report["tflop_per_image"] > 1
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(f"sdxl-random 256x256x2, 1 CPU device: compile {report['compile_s']:.0f}s, peak RSS {peak_gib:.1f} GiB")
    assert peak_gib < PEAK_LIMIT_GIB
