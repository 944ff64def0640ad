"""Per-request cost of what the serving path adds for real-size images: PNG encode (4 in parallel),
the Redis round trip of the result, and base64 for the JSON answer.

    .venv/bin/python bench/encode.py [--size 1024] [--repeats 10]

Noise is the worst case for PNG; a smooth gradient stands in for a photograph-like image.
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.host import describe
from worker.encode import Encoding, encode_all


def images(kind: str, size: int) -> np.ndarray:
    if kind == "noise":
        return np.random.default_rng(0).integers(0, 256, (4, size, size, 3), dtype=np.uint8)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    frame = np.stack(
        [ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1), np.full((size, size), 128, np.float32)], axis=-1
    )
    return np.stack([frame] * 4).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--encodings",
        default="png:1,png:6,jpeg:90,webp:90",
        help="FORMAT:SETTING,... (PNG zlib level, JPEG/WebP quality)",
    )
    args = parser.parse_args()
    print(f"machine: {describe()}; 4 images {args.size}x{args.size}")
    print(f"{'image':<9}{'encoding':>10}{'encode p50 ms':>15}{'base64 p50 ms':>15}{'MB/request':>12}")
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for kind in ("noise", "gradient"):
            batch = images(kind, args.size)
            for spec in args.encodings.split(","):
                fmt, _, setting = spec.partition(":")
                # The encode alone: what the watermark adds before it is bench/watermark.py's.
                encoding = (
                    Encoding("png", png_compress_level=int(setting), watermark=False)
                    if fmt == "png"
                    else Encoding(fmt, quality=int(setting), watermark=False)
                )
                enc, b64, size = [], [], 0
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    encoded = encode_all(batch, encoding, pool)
                    t1 = time.perf_counter()
                    [base64.b64encode(e) for e in encoded]
                    t2 = time.perf_counter()
                    enc.append((t1 - t0) * 1000)
                    b64.append((t2 - t1) * 1000)
                    size = sum(map(len, encoded))
                print(
                    f"{kind:<9}{spec:>10}{statistics.median(enc):>15.1f}{statistics.median(b64):>15.1f}"
                    f"{size / 1e6:>12.2f}"
                )


if __name__ == "__main__":
    main()
