"""Load time and peak host memory of each checkpoint format, on the tiny model (or a given model):

    python -m bench.checkpoints [--model DIR] [--json]

The tiny model is written in each format (worker/tiny_formats.py); each load runs in a fresh process
(`worker.checkpoints.load_checkpoint`, host parameters in bfloat16, nothing put on a device), which reports
its wall time and peak resident memory (ru_maxrss). The process's imports are timed apart from the load.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.host import describe

_CHILD = """
import json, resource, sys, time
started = time.perf_counter()
from worker.checkpoints import load_checkpoint
imported = time.perf_counter()
rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
load_checkpoint(sys.argv[1], model_config=sys.argv[2] or None)
print(json.dumps({
    "import_s": imported - started,
    "load_s": time.perf_counter() - imported,
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "rss_after_import_mib": rss_before / 1024,
}))
"""


def formats(model: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """Each format of `model`: (what --model names, the model config a single file needs)."""
    from worker.tiny_formats import write_diffusers_safetensors, write_single_file

    return {
        "flax": (model, ""),
        "diffusers fp32": (write_diffusers_safetensors(model, root / "fp32"), ""),
        "diffusers fp16 variant": (write_diffusers_safetensors(model, root / "fp16", np.float16, "fp16"), ""),
        "single file fp16": (write_single_file(model, root / "single.safetensors"), str(model)),
    }


def measure(model: Path, config: str) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(model), config], check=True, capture_output=True, text=True
    )
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a Flax diffusers-layout model (default: the tiny model)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-checkpoints-") as scratch:
        root = Path(scratch)
        model = args.model
        if model is None:
            from worker.tiny_model import write_tiny_model

            model = write_tiny_model(root / "tiny")
        for name, (path, config) in formats(model, root).items():
            result = {"format": name, "host": describe(), **measure(path, config)}
            if args.json:
                print(json.dumps(result))
            else:
                print(
                    f"{name:24s} load {result['load_s']:6.2f}s  peak RSS {result['peak_rss_mib']:7.0f} MiB "
                    f"(after imports {result['rss_after_import_mib']:.0f} MiB)  [{result['host']}]"
                )


if __name__ == "__main__":
    main()
