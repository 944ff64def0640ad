"""The engine's step time with LoRA adapters: `sdxl-serve bench lora --model DIR [--ranks 8,32,128] [--json]`.

In-process, on the local devices: a full batch of guided `n=1` requests (`--rows-per-device` rows per device, the
largest bucket), and the median time of one denoising step, the cases taking turns in `--rounds` rounds (a shared
machine's drift reaches them alike), with:

- `no LoRA`: an engine without adapters (the step executables as they were before adapters);
- `no adapter`: an engine with a bank of `rank`, its requests naming none (what the bank costs a plain row);
- `shared`: every row the same adapter;
- `per row`: every row its own adapter (the pool as many slots as rows).

Each adapter has a random update of `rank` for every layer the bank holds (UNet and text encoders). Also per rank:
the seconds to make and pad one adapter (`prepare_s`, on the pool's thread in a worker) and to write it into the
bank (`write_s`, between steps), and the bank's bytes per adapter slot on each device. Prints a markdown table, or
one JSON object with `--json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

from bench.host import describe, size_flag
from common.protocol import GenerationParams, LoraRef, ResolvedParams, Shape, Size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local diffusers directory (the tiny model) or sdxl-random")
    parser.add_argument("--size", default="64x64", help="WIDTHxHEIGHT (default 64x64, the tiny model's)")
    parser.add_argument("--ranks", default="8,32,128", help="comma-separated adapter ranks (default 8,32,128)")
    parser.add_argument("--steps", type=int, default=10, help="steps timed per case (default 10)")
    parser.add_argument("--rows-per-device", type=int, default=2, help="engine rows per device (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds in which the cases take turns (default 3)")
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


def request(index: int, shape: Shape, lora: str | None) -> ResolvedParams:
    """A guided n=1 request, naming `lora` if given."""
    loras = [] if lora is None else [LoraRef(name=lora)]
    return GenerationParams(prompt=f"row {index}", n=1, loras=loras).resolved(shape, index)


Case = tuple[Any, Callable[[int], str | None]]  # an engine, and the adapter each row names (None: none)


def step_times(engine: Any, size: Size, rows: int, steps: int, adapter_of: Callable[[int], str | None]) -> list[float]:
    """The wall time of each of `steps` engine steps with `rows` requests running (after two steps to settle: the
    first admits and loads)."""
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
    return times[2 : 2 + steps]


def alternate(cases: dict[str, Case], size: Size, rows: int, steps: int, rounds: int) -> dict[str, float]:
    """The median step seconds of each case, the cases taking turns in each round (in a rotated order), so that
    a machine's drift reaches every case alike."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for turn in range(rounds):
        for name in names[turn % len(names) :] + names[: turn % len(names)]:
            engine, adapter_of = cases[name]
            times[name] += step_times(engine, size, rows, steps, adapter_of)
    return {name: statistics.median(values) for name, values in times.items()}


def measure(
    model: str, size: Size, ranks: Sequence[int], steps: int, rows_per_device: int, rounds: int = 3
) -> dict[str, Any]:
    """Median step seconds per case and rank (every case of every rank alternating with `no LoRA`), the seconds to
    read, pad and write one adapter into the bank, and the bank's device bytes per adapter slot."""
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
    targets = targets_of(pipeline._params)
    cases: dict[str, Case] = {"no LoRA": (plain, lambda i: None)}
    engines = {}
    for rank in ranks:
        config = LoraConfig(slots=rows, max_rank=rank, max_loras=1)
        engines[rank] = engine = RowEngine(pipeline, rows_per_device, lora=config, load_lora=_Library(targets, rank))
        engine.compile(size)
        cases |= {
            f"{rank}/no adapter": (engine, lambda i: None),
            f"{rank}/shared": (engine, lambda i: "a0"),
            f"{rank}/per row": (engine, lambda i: f"a{i}"),
        }
    medians = alternate(cases, size, rows, steps, rounds)
    report: dict[str, Any] = {"no LoRA": medians["no LoRA"], "ranks": {}}
    for rank, engine in engines.items():
        report["ranks"][rank] = {case: medians[f"{rank}/{case}"] for case in ("no adapter", "shared", "per row")}
        report["ranks"][rank] |= _adapter_costs(engine, _Library(targets, rank))
        engine.close()
    return report


def _adapter_costs(engine: Any, library: _Library) -> dict[str, float]:
    """Seconds to make, pad and write one adapter into the bank (the pool does the first two off the step path), and
    the bank's bytes per slot on each device."""
    from worker.lora import pad

    bank = engine._bank
    started = time.perf_counter()
    padded = pad(library("fresh"), bank.targets, bank.config.max_rank)
    prepared = time.perf_counter()
    bank.write(0, padded)
    jax_leaves = [array for layers in bank.arrays.values() for pair in layers.values() for array in pair.values()]
    for array in jax_leaves:
        array.block_until_ready()
    written = time.perf_counter()
    return {
        "prepare_s": prepared - started,
        "write_s": written - prepared,
        "bytes_per_slot": bank.nbytes / bank.config.slots,
    }


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
    base = report["no LoRA"]
    lines = [
        f"`{report['command']}` on {report['host']}, {report['devices']} devices, {report['rows']} rows; median step "
        f"time, the cases alternating in rounds; no LoRA {1000 * base:.1f} ms:",
        "",
        "| rank | no adapter | shared | per row | adapter write (ms) | bank per adapter (MB per device) |",
        "|---|---|---|---|---|---|",
    ]
    for rank, cases in report["ranks"].items():
        ratios = [f"{1000 * cases[c]:.1f} ms ({cases[c] / base:.2f}x)" for c in ("no adapter", "shared", "per row")]
        costs = [f"{1000 * cases['write_s']:.1f}", f"{cases['bytes_per_slot'] / 2**20:.2f}"]
        lines.append("| " + " | ".join([str(rank), *ratios, *costs]) + " |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    ranks, size = _ranks(args.ranks), size_flag(args.size)
    from worker.cli import use_cpu_devices

    use_cpu_devices(args.cpu_devices)
    import jax

    report = measure(args.model, size, ranks, args.steps, args.rows_per_device, args.rounds)
    report |= {
        "command": f"sdxl-serve bench lora --model {args.model} --size {args.size} --ranks {args.ranks} "
        f"--steps {args.steps} --rows-per-device {args.rows_per_device} --rounds {args.rounds}",
        "host": describe(),
        "devices": jax.local_device_count(),
        "rows": args.rows_per_device * jax.local_device_count(),
    }
    print(json.dumps(report) if args.json else markdown(report))
    return 0
