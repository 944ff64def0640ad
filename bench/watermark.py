"""What the invisible watermark costs per image, against the encode it comes before.

    .venv/bin/python bench/watermark.py [--size 1024] [--repeats 20] [--batch 4] [--cpu-devices 4]

The measurements alternate in one run. The numpy reference (worker/watermark.py) marks one image at a time on
one thread; the worker marks on its devices (worker/device_watermark.py), the whole batch in one jitted call,
timed from host pixels to host pixels (the transfers in) and given per image. Then each encoding of the
image as it is and of the image with the mark on it: the mark is fine texture, which compresses worse.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.host import describe

if __name__ == "__main__":  # before JAX is imported: it reads XLA_FLAGS once
    _devices = sys.argv[sys.argv.index("--cpu-devices") + 1] if "--cpu-devices" in sys.argv else "4"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={_devices}"

from worker.device_watermark import DeviceWatermark
from worker.encode import Encoding, encode
from worker.watermark import watermark_one

ENCODINGS = {
    "png:1": Encoding("png", png_compress_level=1, watermark=False),
    "webp:90": Encoding("webp", quality=90, watermark=False),
}


def image(kind: str, size: int) -> np.ndarray:
    """Noise (the worst case for the encoders) or a smooth gradient (closer to a generated image)."""
    if kind == "noise":
        return np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    frame = np.stack([ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1), np.full((size, size), 128.0)], -1)
    return frame.astype(np.uint8)


def timed(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return (time.perf_counter() - started) * 1000


def measure(pixels: np.ndarray, repeats: int, batch: int) -> dict[str, list[float]]:
    """Milliseconds per image of each case, the cases taken in turn within each repeat."""
    device = DeviceWatermark()
    batched = np.stack([pixels] * batch)
    device.apply(batched)  # compiled here, as the worker does at warm-up
    cases: dict[str, Callable[[], object]] = {
        "mark, numpy": lambda: watermark_one(pixels),
        "mark, devices": lambda: device.apply(batched),
    }
    marked = watermark_one(pixels)
    for name, encoding in ENCODINGS.items():
        # What the encode threads pay now that the devices mark: the encode of pixels that carry the mark.
        cases[f"{name} unmarked"] = lambda encoding=encoding: encode(pixels, encoding)  # type: ignore[misc]
        cases[f"{name} of marked"] = lambda encoding=encoding: encode(marked, encoding)  # type: ignore[misc]
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, work in cases.items():
            times[name].append(timed(work) / (batch if name == "mark, devices" else 1))
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4, help="images per call of the devices' mark")
    parser.add_argument("--cpu-devices", type=int, default=4, help="virtual CPU devices where no accelerator is")
    args = parser.parse_args()
    import jax

    devices = jax.local_devices()
    print(f"machine: {describe()}; {len(devices)} {devices[0].device_kind} devices; {args.size}x{args.size} images, "
          f"the devices' mark {args.batch} a call; {args.repeats} repeats; ms per image")  # fmt: skip
    print(f"{'image':<10}{'case':<18}{'p50 ms':>9}{'min ms':>9}")
    for kind in ("noise", "gradient"):
        for name, samples in measure(image(kind, args.size), args.repeats, args.batch).items():
            print(f"{kind:<10}{name:<18}{statistics.median(samples):>9.1f}{min(samples):>9.1f}")


if __name__ == "__main__":
    main()
