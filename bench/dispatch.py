"""Host time to hand a denoising step its parameters: `sdxl-serve bench dispatch [--calls 200] [--json]`.

Each call of a compiled executable flattens its arguments and checks each array on the host, whatever the
executable computes. This benchmark compiles, over the local devices as the worker does (`jax.jit` of
`jax.shard_map`, replicated parameters, the batch split, the state donated), a step that reads four parameter
arrays, and passes it SDXL's UNet parameter tree (its 1,680 arrays, each of one element: the host's cost is per
array, not per byte) in two ways that take turns in `--rounds` rounds:

- `nested dicts`: the tree as the model loads it (the executables' argument before `FlatParams`);
- `flat`: the same arrays as `worker.flat_params.FlatParams` (what the pipeline and the engine pass now);
- `16 buffers`: what the host would pay were the parameters packed into 16 large arrays by dtype. Not built: each
  step would slice every weight out of its buffer on the device, which XLA does by copying any weight a matrix
  multiply or convolution reads (about 5 GB read and written per SDXL step), against at most a millisecond of
  host time that the device's step hides (the next step is queued before the host waits on the last).

It reports the median host time of one call (the call returns once dispatched; the device's work is a few adds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from bench.host import describe

PACKED_BUFFERS = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calls", type=int, default=200, help="calls timed per case and round (default 200)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds in which the cases take turns (default 3)")
    parser.add_argument(
        "--cpu-devices", type=int, default=4, help="virtual devices JAX makes of the CPU when there is no accelerator"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def main(args: argparse.Namespace) -> int:
    if args.calls < 1 or args.rounds < 1:
        raise SystemExit("--calls and --rounds: at least 1")
    from worker.cli import use_cpu_devices

    use_cpu_devices(args.cpu_devices)
    report = measure(args.calls, args.rounds)
    print(json.dumps(report) if args.json else _table(report))
    return 0


def measure(calls: int, rounds: int) -> dict[str, Any]:
    """Median host ms per call of each case, and what was measured on."""
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from worker.flat_params import FlatParams
    from worker.sdxl_arch import abstract_params, components

    mesh = Mesh(np.array(jax.local_devices()), ("data",))
    specs = (PartitionSpec(), PartitionSpec("data"))  # type: ignore[no-untyped-call]  # replicated, split
    replicated = NamedSharding(mesh, specs[0])
    tree = {"unet": abstract_params(components())["unet"]}
    nested = jax.tree_util.tree_map(lambda _: jax.device_put(np.ones(1, np.float32), replicated), tree)
    buffers = {f"buffer{i}": jax.device_put(np.ones(1, np.float32), replicated) for i in range(PACKED_BUFFERS)}
    cases = {"nested dicts": nested, "flat": FlatParams.of(nested), f"{PACKED_BUFFERS} buffers": FlatParams.of(buffers)}
    state = jax.device_put(np.zeros((jax.local_device_count(), 8), np.float32), NamedSharding(mesh, specs[1]))
    executables = {name: _step(mesh, specs).lower(params, state).compile() for name, params in cases.items()}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, params in cases.items():
            state = _timed(executables[name], params, state, calls, times[name])
    medians = {name: 1000 * statistics.median(values) for name, values in times.items()}
    return {
        "measurement": "dispatch",
        "machine": f"{describe()}, {jax.local_device_count()} x {jax.local_devices()[0].device_kind}",
        "jax": jax.__version__,
        "arrays": len(jax.tree_util.tree_leaves(nested)),
        "calls": calls * rounds,
        "host_ms_per_call": medians,
        "saved_ms_per_call": medians["nested dicts"] - medians["flat"],
    }


def _step(mesh: Any, specs: tuple[Any, Any]) -> Any:
    """A step over the mesh that reads four of its parameters (as every executable does, by key path)."""
    import jax

    def step(params: Any, state: Any) -> Any:
        return state + sum(leaf.sum() for leaf in jax.tree_util.tree_leaves(dict(params))[:4])

    mapped = jax.shard_map(step, mesh=mesh, in_specs=specs, out_specs=specs[1])
    return jax.jit(mapped, donate_argnums=(1,))


def _timed(executable: Any, params: Any, state: Any, calls: int, into: list[float]) -> Any:
    """Call `calls` times, each call's host time into `into`; the state donated and passed on, as steps do."""
    state = executable(params, state)
    state.block_until_ready()
    for _ in range(calls):
        started = time.perf_counter()
        state = executable(params, state)
        into.append(time.perf_counter() - started)
    state.block_until_ready()
    return state


def _table(report: dict[str, Any]) -> str:
    rows = [f"| {name} | {ms:.3f} |" for name, ms in report["host_ms_per_call"].items()]
    return "\n".join(
        [
            f"{report['machine']}, jax {report['jax']}: SDXL's UNet, {report['arrays']} arrays,"
            f" {report['calls']} calls",
            "",
            "| parameters passed as | host ms per call (median) |",
            "| --- | ---: |",
            *rows,
            f"| **saved per step** | **{report['saved_ms_per_call']:.3f}** |",
        ]
    )
