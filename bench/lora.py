"""The engine's step time with LoRA adapters: `sdxl-serve bench lora --model DIR [--ranks 8,32,128] [--json]`.

In-process, on the local devices: a full batch of guided `n=1` requests (`--rows-per-device` rows per device, the
largest bucket), and the median time of one denoising step, with:

- `no LoRA`: an engine without adapters (the step executables as they were before adapters);
- `no adapter`: an engine with a bank of `rank`, its requests naming none (what the bank costs a plain row);
- `shared`: every row the same adapter;
- `per row`: every row its own adapter (the pool as many slots as rows).

Each adapter has a random update of `rank` for every layer the bank holds (UNet and text encoders). Prints a
markdown table, or one JSON object with `--json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

from bench.host import describe
from common.protocol import GenerationParams, LoraRef, ResolvedParams, Shape, Size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local diffusers directory (the tiny model) or sdxl-random")
    parser.add_argument("--size", default="64x64", help="WIDTHxHEIGHT (default 64x64, the tiny model's)")
    parser.add_argument("--ranks", default="8,32,128", help="comma-separated adapter ranks (default 8,32,128)")
    parser.add_argument("--steps", type=int, default=10, help="steps timed per case (default 10)")
    parser.add_argument("--rows-per-device", type=int, default=2, help="engine rows per device (default 2)")
    parser.add_argument(
        "--cpu-devices", type=int, default=4, help="virtual devices JAX makes of the CPU when there is no accelerator"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _ranks(text: str) -> tuple[int, ...]:
    try:
        ranks = tuple(int(part) for part in text.split(","))
    except ValueError:
        ranks = ()
    if not ranks or min(ranks) < 1:
        raise SystemExit(f"--ranks: comma-separated positive integers (got {text!r})")
    return ranks


def _size(text: str) -> Size:
    width, _, height = text.partition("x")
    try:
        return Size(width=int(width), height=int(height))
    except ValueError:
        raise SystemExit(f"--size: WIDTHxHEIGHT, e.g. 64x64 (got {text!r})") from None


def request(index: int, shape: Shape, lora: str | None) -> ResolvedParams:
    """A guided n=1 request, naming `lora` if given."""
    loras = [] if lora is None else [LoraRef(name=lora)]
    return GenerationParams(prompt=f"row {index}", n=1, loras=loras).resolved(shape, index)


def step_seconds(engine: Any, size: Size, rows: int, steps: int, adapter_of: Callable[[int], str | None]) -> float:
    """The median wall time of one engine step with `rows` requests running (after two steps to settle)."""
    shape = Shape(width=size.width, height=size.height, steps=steps + 2)
    for index in range(rows):
        engine.admit(f"r{index}", request(index, shape, adapter_of(index)), lambda step: None)
    times: list[float] = []
    while engine.busy:
        started = time.perf_counter()
        tick = engine.step()
        times.append(time.perf_counter() - started)
        if tick.stopped or tick.failed:
            raise RuntimeError(f"a benchmark request ended badly: {tick.stopped or tick.failed}")
    return statistics.median(times[2 : 2 + steps])


def measure(model: str, size: Size, ranks: Sequence[int], steps: int, rows_per_device: int) -> dict[str, Any]:
    """Median step seconds per case and rank; `no LoRA` once."""
    import jax

    from worker.engine import RowEngine
    from worker.lora import LoraConfig
    from worker.lora_bank import targets_of
    from worker.pipeline import PipelineOptions, SDXLPipeline

    devices = jax.local_device_count()
    options = PipelineOptions(images_per_request=devices, max_steps=steps + 2)
    pipeline = SDXLPipeline.load(model, None, options)
    rows = rows_per_device * devices
    plain = RowEngine(pipeline, rows_per_device)
    plain.compile(size)
    report: dict[str, Any] = {"no LoRA": step_seconds(plain, size, rows, steps, lambda i: None), "ranks": {}}
    targets = targets_of(pipeline._params)
    for rank in ranks:
        library = _Library(targets, rank)
        config = LoraConfig(slots=rows, max_rank=rank, max_loras=1)
        engine = RowEngine(pipeline, rows_per_device, lora=config, load_lora=library)
        engine.compile(size)
        report["ranks"][rank] = {
            "no adapter": step_seconds(engine, size, rows, steps, lambda i: None),
            "shared": step_seconds(engine, size, rows, steps, lambda i: "a0"),
            "per row": step_seconds(engine, size, rows, steps, lambda i: f"a{i}"),
        }
        engine.close()
    return report


class _Library:
    """Random adapters of one rank, made on first read."""

    def __init__(self, targets: dict[Any, tuple[int, int]], rank: int) -> None:
        self.targets, self.rank = targets, rank

    def __call__(self, name: str) -> Any:
        import numpy as np

        from worker.lora import Adapter, Factors

        rng = np.random.default_rng(zlib.crc32(name.encode()))
        return Adapter(
            name,
            {
                target: Factors(
                    rng.normal(0, 0.02, (fan_in, self.rank)).astype(np.float32),
                    rng.normal(0, 0.02, (self.rank, fan_out)).astype(np.float32),
                )
                for target, (fan_in, fan_out) in self.targets.items()
            },
        )


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"`{report['command']}` on {report['host']}, {report['devices']} devices, {report['rows']} rows:",
        "",
        "| rank | no LoRA (ms) | no adapter (ms) | shared (ms) | per row (ms) |",
        "|---|---|---|---|---|",
    ]
    for rank, cases in report["ranks"].items():
        cells = [rank, report["no LoRA"], cases["no adapter"], cases["shared"], cases["per row"]]
        lines.append("| " + " | ".join(str(c) if i == 0 else f"{1000 * c:.1f}" for i, c in enumerate(cells)) + " |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    ranks, size = _ranks(args.ranks), _size(args.size)
    from worker.cli import use_cpu_devices

    use_cpu_devices(args.cpu_devices)
    import jax

    report = measure(args.model, size, ranks, args.steps, args.rows_per_device)
    report |= {
        "command": f"sdxl-serve bench lora --model {args.model} --size {args.size} --ranks {args.ranks} "
        f"--steps {args.steps} --rows-per-device {args.rows_per_device}",
        "host": describe(),
        "devices": jax.local_device_count(),
        "rows": args.rows_per_device * jax.local_device_count(),
    }
    print(json.dumps(report) if args.json else markdown(report))
    return 0
